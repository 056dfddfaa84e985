#!/usr/bin/env bash
# The bench kit's gateway section (service over an instant backend vs a bare
# tonic server) for two builds, before and after a change, on a quiet
# machine: the shared 2-core development box is too noisy for these figures.
# The device machine (16 cores) has no Rust toolchain, but a release binary
# built here runs there unchanged, so the binaries travel.
#
# Here:  scripts/bench-device.sh pack NAME=WORKTREE... [--into DIR]
#          (with CARGO_TARGET_DIR set as for any build here), e.g.
#          `pack before=/work/wt/before after=/work/wt/bench`: builds each
#          worktree's kit bench (release), strips it and copies it as
#          DIR/kit-NAME, with this script, into DIR (default:
#          $CARGO_TARGET_DIR/bench-device, which is target/bench-device of
#          the checkout the device tool sends: ignored, so name it in the
#          tool's `carry`).
# There: bash target/bench-device/bench-device.sh run ROUNDS NAME...
#          runs the builds alternately (before, after, before, ...) ROUNDS
#          times each with `--only gateway`, keeps each log as
#          $OUT/NAME-ROUND.log, and prints the medians and every run's ratio.
# Also:  scripts/bench-device.sh summary LOG...   (the table of saved logs)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

pack() {
  local dir="${CARGO_TARGET_DIR:-$here/../target}/bench-device" builds=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --into) dir="$2"; shift 2 ;;
      *=*) builds+=("$1"); shift ;;
      *) echo "pack: NAME=WORKTREE expected, got $1" >&2; exit 2 ;;
    esac
  done
  local cache_dir="${RIGGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rigger-inference}"
  # cmake and libclang for llama.cpp's build, as the Makefile has them.
  # shellcheck source=/dev/null
  source "$cache_dir/build.env"
  mkdir -p "$dir"
  local build name tree executable
  for build in "${builds[@]}"; do
    name="${build%%=*}" tree="${build#*=}"
    executable="$(cd "$tree" && nice -n 10 cargo bench --locked --bench kit --no-run 2>&1 |
      sed -n 's/.*Executable benches\/kit.rs (\(.*\))$/\1/p' | tail -1)"
    [ -x "$executable" ] || { echo "no kit executable built in $tree" >&2; exit 1; }
    strip -o "$dir/kit-$name" "$executable"
    echo "$name: $executable ($(git -C "$tree" describe --always --dirty)) -> $dir/kit-$name"
  done
  cp "$here/bench-device.sh" "$dir/"
  du -sh "$dir"
}

run() {
  local rounds="$1" logs="${OUT:-.}"
  shift
  mkdir -p "$logs"
  echo "$(nproc) cores, $(uname -r)"
  local round name
  for round in $(seq 1 "$rounds"); do
    for name in "$@"; do
      echo "== $name round $round"
      "$here/kit-$name" --only gateway | tee "$logs/$name-$round.log"
    done
  done
  local logged=()
  for name in "$@"; do
    logged+=("$logs/$name"-*.log)
  done
  summary "${logged[@]}"
}

# Every log's gateway rows, then per build the median of each figure.
summary() {
  python3 - "$@" <<'EOF'
import re, statistics, sys
from collections import defaultdict

ROW = re.compile(r"^(unary EnhanceTask|streaming Generate) (requests/s|p50 ms|p99 ms)\s+([\d.]+)\s+([\d.]+)")
runs = defaultdict(lambda: defaultdict(list))
for path in sys.argv[1:]:
    build = path.rsplit("/", 1)[-1].split("-")[0]
    for line in open(path):
        match = ROW.match(line)
        if match:
            kind, figure, ours, bare = match.groups()
            runs[build][(kind, figure)].append((float(ours), float(bare)))
print(f"{'':40} {'build':>6} {'service':>10} {'bare':>10} {'ratio':>6}  ratios of each run")
for build in runs:
    for (kind, figure), values in runs[build].items():
        ours = statistics.median(v[0] for v in values)
        bare = statistics.median(v[1] for v in values)
        each = " ".join(f"{v[0] / v[1]:.2f}" for v in values)
        print(f"{kind + ' ' + figure:40} {build:>6} {ours:10.3f} {bare:10.3f} {ours / bare:6.2f}  {each}")
EOF
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  summary) shift; summary "$@" ;;
  *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
