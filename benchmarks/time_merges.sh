#!/usr/bin/env bash
# Wall time and peak RSS, from /usr/bin/time -v, of three ways to produce the same output
# bytes for one checkpoint pair, run back to back on the same disk:
#   fastmerge slerp A B --t 0.6   |   benchmarks/naive_merge.py (load both, merge, save_file)
#   |   writing the same number of bytes to a file (python, 8 MiB writes, then fsync)
#
#   bash benchmarks/time_merges.sh BASE_DIR OTHER_DIR [WORK_DIR]
# fastmerge.synthetic.write_pair builds pairs: "smollm-135m", or "1b" with shards=3.
set -euo pipefail
base=$1 other=$2 work=${3:-$(mktemp -d)}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
mkdir -p "$work"

measure() {  # label, command...
    local label=$1; shift
    local log="$work/time.log"
    /usr/bin/time -v "$@" > /dev/null 2> "$log"
    local wall rss
    wall=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$log" | awk '{print $NF}')
    printf '| %-34s | %10s | %8.0f MiB |\n' "$label" "$wall" "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')"
}

rm -rf "$work/fastmerge" "$work/naive"
bytes=$($python -c "import sys, fastmerge.plan as p, fastmerge.reader as r; \
a, b = r.open_checkpoint(sys.argv[1]), r.open_checkpoint(sys.argv[2]); \
print(p.build_plan(a, b, 0.6).output_bytes)" "$base" "$other")

echo "pair: $base + $other, t = 0.6, $bytes output bytes"
echo "| what | wall (m:ss) | peak RSS |"
echo "|---|---|---|"
measure "fastmerge slerp" "$python" -m fastmerge slerp "$base" "$other" --t 0.6 -o "$work/fastmerge" --quiet
measure "naive load-merge-save script" "$python" "$here/naive_merge.py" "$base" "$other" "$work/naive" 0.6
measure "write the same bytes + fsync" "$python" -c "
import os, sys
left, block = int(sys.argv[1]), memoryview(bytearray(8 << 20))
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
while left:
    left -= os.write(fd, block[: min(left, len(block))])
os.fsync(fd)
os.close(fd)
os.unlink(sys.argv[2])" "$bytes" "$work/floor.bin"
rm -rf "$work/fastmerge" "$work/naive"
