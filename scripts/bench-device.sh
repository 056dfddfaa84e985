#!/usr/bin/env bash
# The bench kit's gateway section (service over an instant backend vs a bare
# tonic server) for two builds, before and after a change, on a quiet
# machine: the shared 2-core development box is too noisy for these figures.
# The device machine (16 cores) has no Rust toolchain, but a release binary
# built here runs there unchanged, so the binaries travel.
#
# Here:  scripts/bench-device.sh pack BEFORE_WORKTREE AFTER_WORKTREE [DIR]
#          builds each worktree's kit bench (release), strips it and copies
#          it, with this script, into DIR (default: target/bench-device
#          under the checkout the device tool sends; ignored, so name it in
#          the tool's `carry`).
# There: bash target/bench-device/bench-device.sh run [ROUNDS] [DIR]
#          runs the two binaries alternately (before, after, before, ...)
#          ROUNDS times each with `--only gateway`, keeps each log under $OUT
#          (or DIR), and prints every run and the medians.
# Also:  scripts/bench-device.sh summary LOG...   (the table of saved logs)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

pack() {
  local before="$1" after="$2" dir="${3:-/work/main/target/bench-device}"
  mkdir -p "$dir"
  local name tree executable
  for name in before after; do
    tree="$before"
    [ "$name" = after ] && tree="$after"
    executable="$(cd "$tree" && nice -n 10 cargo bench --locked --bench kit --no-run 2>&1 |
      sed -n 's/.*Executable benches\/kit.rs (\(.*\))$/\1/p' | tail -1)"
    [ -x "$executable" ] || { echo "no kit executable built in $tree" >&2; exit 1; }
    strip -o "$dir/kit-$name" "$executable"
    echo "$name: $executable ($(git -C "$tree" rev-parse --short HEAD)) -> $dir/kit-$name"
  done
  cp "$here/bench-device.sh" "$dir/"
  du -sh "$dir"
}

run() {
  local rounds="${1:-2}" logs="${2:-${OUT:-.}}"
  mkdir -p "$logs"
  echo "$(nproc) cores, $(uname -r)"
  local round name
  for round in $(seq 1 "$rounds"); do
    for name in before after; do
      echo "== $name round $round"
      "$here/kit-$name" --only gateway | tee "$logs/$name-$round.log"
    done
  done
  summary "$logs"/before-*.log "$logs"/after-*.log
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
for build in ("before", "after"):
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
