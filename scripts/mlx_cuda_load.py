"""Concurrent Generate streams through a running rigger-inference, for the
MLX-on-CUDA figures (run by scripts/device-gpu.sh on the device).

  python mlx_cuda_load.py ADDRESS DESCRIPTORS [--streams 1,4,16,64]
                          [--tokens 128] [--timeout 300]
  python mlx_cuda_load.py --worker WORKER_PY --model DIR --cache-dir DIR
                          [--max-batch 64] [--no-alone] [--streams ...]

The second form is the runtime called directly, for the gateway's relay
ratio: it starts our worker (WORKER_PY, the worker the gateway embeds, on
mlx-lm's BatchGenerator) itself and sends the very requests the gateway
would send it over its line protocol, from the same threads, prompts and
seeds, with no gRPC and no gateway in between.

DESCRIPTORS is the service's file-descriptor set (the build's
rigger_inference_descriptor.bin), so no generated code or reflection
client is needed there. It waits for the service to be SERVING, times the
first request after readiness, answers each prompt alone (seeded), then
runs each concurrency and compares every stream's answer with its answer
alone. Prints one JSON object per run and a table.
"""

import argparse
import json
import queue
import subprocess
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

SERVICE = "rigger.inference.v1.InferenceService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse{status: SERVING}, as bytes: the
# health messages are not in the service's descriptors.
SERVING = b"\x08\x01"
# HealthCheckRequest{service: SERVICE}: the empty name answers SERVING
# while the backend is still loading.
HEALTH_REQUEST = b"\x0a" + bytes([len(SERVICE)]) + SERVICE.encode()
TOPICS = [
    "a lighthouse keeper", "three uses of a paperclip", "why the sky is blue",
    "the history of bread", "a robot learning to paint", "tidal energy",
]


def prompt(index):
    return f"Write a short paragraph about {TOPICS[index % len(TOPICS)]} (request {index})."


class Client:
    def __init__(self, address, descriptors):
        files = descriptor_pb2.FileDescriptorSet.FromString(open(descriptors, "rb").read())
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.Add(file)
        method = pool.FindServiceByName(SERVICE).methods_by_name["Generate"]
        self.request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_concurrent_streams", 1024)])
        self.generate = self.channel.unary_stream(
            f"/{SERVICE}/Generate",
            request_serializer=self.request.SerializeToString,
            response_deserializer=response.FromString,
        )
        self.health = self.channel.unary_unary(HEALTH_CHECK, request_serializer=bytes, response_deserializer=bytes)

    def wait_serving(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health(HEALTH_REQUEST, timeout=2) == SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        return False

    def stream(self, index, tokens, timeout):
        """One Generate call: its text, time to first text, end, summary."""
        request = json_format.ParseDict({
            "prompt": prompt(index),
            "sampling": {"max_tokens": tokens, "temperature": 0.7, "seed": 1000 + index},
        }, self.request())
        started = time.perf_counter()
        result = {"index": index, "text": "", "ttft": None, "error": None}
        try:
            for event in self.generate(request, timeout=timeout):
                if event.HasField("summary"):
                    result["completion_tokens"] = event.summary.meta.completion_tokens
                    result["finish"] = event.summary.finish_reason
                elif event.text:
                    if result["ttft"] is None:
                        result["ttft"] = time.perf_counter() - started
                    result["text"] += event.text
        except grpc.RpcError as error:
            result["error"] = f"{error.code().name}: {error.details()}"
        result["seconds"] = time.perf_counter() - started
        return result


class WorkerClient:
    """The worker's line protocol, with Client's wait_serving and stream:
    one reader thread hands each reply to its request's queue."""

    def __init__(self, worker, model, cache_dir, max_batch):
        command = [sys.executable, worker, "--model", model, "--cache-dir", cache_dir, "--max-batch", str(max_batch)]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()
        self.replies = {}
        self.next_id = 0
        self.ready = threading.Event()
        self.fatal = None
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.process.stdout:
            reply = json.loads(line)
            if reply.get("event") in ("ready", "fatal"):
                self.fatal = reply.get("message")
                print(json.dumps({"run": "worker " + reply["event"],
                                  "after_s": round(time.perf_counter() - self.started, 2), **reply}), flush=True)
                self.ready.set()
            elif reply.get("id") in self.replies:
                self.replies[reply["id"]].put(reply)
        self.fatal = self.fatal or "the worker exited"
        self.ready.set()
        for replies in list(self.replies.values()):
            replies.put(None)

    def wait_serving(self, timeout):
        return self.ready.wait(timeout) and self.fatal is None

    def stream(self, index, tokens, timeout):
        """One generate request, as Client.stream reports it."""
        replies = queue.Queue()
        with self.lock:
            rid = self.next_id
            self.next_id += 1
            self.replies[rid] = replies
            started = time.perf_counter()
            self.process.stdin.write(json.dumps({
                "op": "generate", "id": rid, "messages": [{"role": "user", "content": prompt(index)}],
                "max_tokens": tokens, "temperature": 0.7, "seed": 1000 + index, "stop": [], "json_schema": None,
            }) + "\n")
            self.process.stdin.flush()
        result = {"index": index, "text": "", "ttft": None, "error": None}
        deadline = started + timeout
        while True:
            try:
                reply = replies.get(timeout=max(deadline - time.perf_counter(), 0))
            except queue.Empty:
                result["error"] = "DEADLINE_EXCEEDED"
                break
            if reply is None:
                result["error"] = f"UNAVAILABLE: {self.fatal}"
                break
            if reply["event"] == "text":
                if result["ttft"] is None:
                    result["ttft"] = time.perf_counter() - started
                result["text"] += reply["text"]
            elif reply["event"] == "done":
                result["completion_tokens"] = reply["generation_tokens"]
                result["finish"] = reply["finish_reason"]
                break
            elif reply["event"] == "error":
                result["error"] = f"INTERNAL: {reply['message']}"
                break
        del self.replies[rid]
        result["seconds"] = time.perf_counter() - started
        return result


def concurrent(client, count, tokens, timeout):
    results = [None] * count
    barrier = threading.Barrier(count)

    def run(index):
        barrier.wait()
        results[index] = client.stream(index, tokens, timeout)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", nargs="?")
    parser.add_argument("descriptors", nargs="?")
    parser.add_argument("--worker", help="call this worker.py directly instead of a service at ADDRESS")
    parser.add_argument("--model", help="the worker's model directory")
    parser.add_argument("--cache-dir", help="the worker's cache (the service's: its kernels are compiled)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--no-alone", action="store_true", help="skip answering each prompt alone")
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--ready-timeout", type=float, default=600)
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]
    if args.worker:
        client = WorkerClient(args.worker, args.model, args.cache_dir, args.max_batch)
    elif args.descriptors:
        client = Client(args.address, args.descriptors)
    else:
        parser.error("give ADDRESS DESCRIPTORS, or --worker")

    waited = time.perf_counter()
    if not client.wait_serving(args.ready_timeout):
        sys.exit(f"{args.address} not SERVING within {args.ready_timeout} s")
    first = client.stream(0, 16, args.timeout)
    print(json.dumps({"run": "first request after readiness", "serving_after_s": round(time.perf_counter() - waited, 2),
                      "ttft_s": first["ttft"], "seconds": round(first["seconds"], 3), "error": first["error"]}), flush=True)

    alone = {}
    for index in range(0 if args.no_alone else max(levels)):
        alone[index] = client.stream(index, args.tokens, args.timeout)
    solo_errors = [r["error"] for r in alone.values() if r["error"]]
    if alone:
        solo_ttfts = [r["ttft"] for r in alone.values() if r["ttft"] is not None]
        solo_tokens = sum(r.get("completion_tokens", 0) for r in alone.values())
        solo_seconds = sum(r["seconds"] for r in alone.values())
        print(json.dumps({"run": "each prompt alone", "requests": len(alone), "errors": len(solo_errors),
                          "tok_s_per_stream": round(solo_tokens / solo_seconds, 1),
                          "ttft_p50_s": round(percentile(solo_ttfts, 0.5) or 0, 3),
                          "ttft_max_s": round(max(solo_ttfts, default=0), 3)}), flush=True)
    rows = []
    for count in levels:
        results, wall = concurrent(client, count, args.tokens, args.timeout)
        done = [r for r in results if r["error"] is None and "finish" in r]
        tokens = sum(r.get("completion_tokens", 0) for r in done)
        same = sum(1 for r in done if r["index"] in alone and r["text"] == alone[r["index"]]["text"])
        ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
        row = {
            "streams": count, "completed": len(done), "same_as_alone": same, "wall_s": round(wall, 3),
            "tokens": tokens, "aggregate_tok_s": round(tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttfts, 0.5) or 0, 3), "ttft_max_s": round(max(ttfts, default=0), 3),
            "errors": sorted({r["error"] for r in results if r["error"]})[:3],
        }
        differing = [r for r in done if r["index"] in alone and r["text"] != alone[r["index"]]["text"]][:2]
        row["differing"] = [{"index": r["index"], "alone": alone[r["index"]]["text"][:60], "batched": r["text"][:60]}
                            for r in differing]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"solo errors: {solo_errors[:3]}")
    print(f"{'streams':>7} {'done':>6} {'same':>6} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT max':>9}")
    for row in rows:
        print(f"{row['streams']:>7} {row['completed']:>6} {row['same_as_alone']:>6} {row['wall_s']:>8} {row['tokens']:>7} "
              f"{row['aggregate_tok_s']:>8} {row['ttft_p50_s']:>9} {row['ttft_max_s']:>9}")


if __name__ == "__main__":
    main()
