#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rigger_inference::fuzzing::wire_framing(data);
});
