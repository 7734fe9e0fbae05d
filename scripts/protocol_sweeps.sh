#!/usr/bin/env bash
# The CPU protocol sweeps of RESULTS.md (Table 6 and Table 1), run from the frozen commit their records name:
#   scripts/protocol_sweeps.sh start     freeze 116cf0d66b (once per machine) and start both sweeps in the
#                                        background, one CPU thread each, finished runs skipped: first the runs
#                                        the lost first pass never measured (FIRST_*, new evidence, in that
#                                        order), then the whole grid in plan order (the reruns of the first pass)
#   scripts/protocol_sweeps.sh stop      kill both sweeps and their runs (a run resumes from its last checkpoint)
#   scripts/protocol_sweeps.sh snapshot  stage the finished runs' records, then regenerate the reports from exactly
#                                        what is staged (not from the sweep's state or a run still being written),
#                                        so that tests/test_committed_results.py agrees on a clean clone
# Data: CHAINLORA_DATA (default ../shared/data). Logs: docs/results/cpu_paper_protocol/records/<sweep>.log (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
D=docs/results/cpu_paper_protocol
COMMIT=116cf0d66b
FROZEN=${FROZEN:-/tmp/chainlora-frozen-$COMMIT}
# records folder, report, plots folder
REPORTS=("cpu_table6_low_data table6_low_data plots_table6" "cpu_table1_paper_scale table1_paper_scale plots_table1")
# Run names (`chainlora sweep --only` regexes) to run before the rest, per sweep, in this order: whole tasks the
# first pass never reached (CB), the cells it left unfinished, then the next blocks it never reached (Table 6 at 50
# examples; Table 1 SST-2). The runs the first pass did measure come last: their first-pass rows stand in for
# them meanwhile (scripts/pool_first_pass.py), and every rerun so far has equalled its row. The sweep's plan stays
# the whole grid.
FIRST_cpu_table6_low_data=('^cb/.*-n100-' '^rte/cola-L3-n100-' '^(sst2|copa|wsc|wic|rte|cb)/.*-n50-')
FIRST_cpu_table1_paper_scale=('^cb/(lora|cola-L3)/' '^wsc/cola-L3/adamw-lr1e-4/' '^wsc/cola-L3/adamw-lr5e-4/seed[34]$'
    '^sst2/(lora|cola-L3)/')

case "${1:-}" in
start)
    [ -d "$FROZEN" ] || ./scripts/freeze.sh "$FROZEN" "$COMMIT"
    for entry in "${REPORTS[@]}"; do
        read -r sweep _ <<<"$entry"
        first="FIRST_$sweep[@]"
        # one detached chain per sweep: `--only` passes in order, then the whole grid (its yaml path is in the
        # chain's command line, so `stop` kills the chain with its runs)
        PYTHONPATH="$FROZEN/src" CHAINLORA_DATA="${CHAINLORA_DATA:-../shared/data}" OMP_NUM_THREADS=1 \
            setsid nohup nice -n 10 bash -c 'yaml=$1; shift
                for only in "$@"; do .venv/bin/python -m chainlora sweep "$yaml" --only "$only" || true; done  # a failed run stays for the next pass
                exec .venv/bin/python -m chainlora sweep "$yaml"' _ "$D/records/$sweep.yaml" "${!first}" \
            >>"$D/records/$sweep.log" 2>&1 </dev/null &
    done
    echo "started; logs: $D/records/*.log" ;;
stop)
    # again while anything is left: a chain killed between its passes could have started the next one
    for _ in 1 2 3 4 5; do
        pkill -KILL -f "$D/records/cpu_table" || true
        sleep 1
        pgrep -f "$D/records/cpu_table" >/dev/null || { echo "stopped"; exit 0; }
    done
    echo "error: sweeps still running" >&2
    exit 1 ;;
snapshot)
    git add "$D/records"
    snap=$(mktemp -d)
    trap 'rm -rf "$snap"' EXIT
    git ls-files -z "$D/records" | xargs -0 git checkout-index --prefix="$snap/" --
    for entry in "${REPORTS[@]}"; do
        read -r sweep report plots <<<"$entry"
        # grep reads the whole list: `grep -q` would stop at the first match, git ls-files would then die of
        # SIGPIPE, and under pipefail the sweep's report would be skipped without a word
        git ls-files "$D/records/$sweep" | grep metrics.json >/dev/null || continue
        (cd "$snap" && OMP_NUM_THREADS=1 "$root/.venv/bin/chainlora" report "$D/records/$sweep" \
            --output "$D/$report.md" --plots_dir "$D/$plots" >/dev/null)
        cp "$snap/$D/$report.md" "$D/$report.md"
        rm -rf "${D:?}/$plots" && cp -r "$snap/$D/$plots" "$D/$plots"
        git add "$D/$report.md" "$D/$plots"
    done
    echo "staged: $(git ls-files "$D/records" | grep -c metrics.json) run records and the reports made from them" ;;
*)
    echo "usage: scripts/protocol_sweeps.sh start|stop|snapshot" >&2
    exit 2 ;;
esac
