# The one device-tool command of a GPU session (device time is scarce: 15 minutes, starts included).
# On this machine first: bash ../shared/gpu/prepare.sh   (fills .gpu/, which is git-ignored)
# Then, with the device tool:  run(command="source .gpu/env.sh >/dev/null || exit 9; bash docs/gpu-runs/run.sh",
#                                  carry=[".gpu"], timeout_s=420)
# The GPU tests first (at most 100 s), `bench file` on the GPU (at most 90 s), then `bench gpu` (its rows, then one VERDICT line per target)
# with what is left of ~345 s as its budget, all under $OUT; the per-row .jsonl files go when the
# final tables were written.
set -o pipefail
L=$OUT/log.txt
timeout 100 python3 -m pytest tests/cuda -q -rf -p no:cacheprovider 2>&1 | tee "$L"; echo "pytest rc=$?" | tee -a "$L"
# Issue 16's load target on a GPU (host RSS of a file-opened session against the file's size): at most 90 s.
timeout 90 python3 -m vzstream bench file --device cuda --out "$OUT" 2>&1 | grep -v "^vzstream: pack" | tee -a "$L"; echo "bench file rc=$?" | tee -a "$L"
B=$((345 - SECONDS)); echo "bench gpu --budget-s $B" | tee -a "$L"
timeout $((385 - SECONDS)) python3 -m vzstream bench gpu --out "$OUT" --budget-s "$B" 2>&1 | tee -a "$L"; echo "bench rc=$?" | tee -a "$L"
# Killed before its end (no gpu.json): the verdicts, read off the rows it kept (unreached: NOT MEASURED).
[ -f "$OUT/gpu.json" ] || python3 -m vzstream.bench.targets "$OUT" 2>&1 | tee -a "$L"
[ -f "$OUT/gpu.json" ] && rm -f "$OUT/gpu.rows.jsonl" "$OUT/gpu_budget.rows.jsonl"
# Where each stage's time went (upload issue time per unit, copy-engine GB/s), into the log.
for t in "$OUT"/trace_*.json.gz; do [ -f "$t" ] && python3 docs/probes/read_trace.py "$t" 2>&1 | tee -a "$L"; done
ls -la "$OUT"
