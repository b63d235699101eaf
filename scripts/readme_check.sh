#!/usr/bin/env bash
# The README's commands run from a folder outside the repository with a non-editable install
# (#17): bash scripts/readme_check.sh .venv-wheel  (built by `make wheel`; a tiny run stands in
# for runs/demo). Prints ok or FAIL with the tail of the output for each command.
set -u
B=$(cd "$1" && pwd)/bin; W=/tmp/outside; rm -rf $W; mkdir -p $W; cd $W; export HOME=$W
run() { echo "== $*"; "$@" > /tmp/rc.out 2>&1; rc=$?; [ $rc = 0 ] && echo "ok" || { echo "FAIL rc=$rc"; tail -5 /tmp/rc.out; }; }
run $B/retnet train --preset tiny --steps 20 --batch-size 4 --seq-len 64 --out runs/demo
run $B/retnet generate --checkpoint runs/demo --prompt "def parse(" --max-new-tokens 20
python3 -c "print('import os\n' * 50)" > doc.txt
run $B/retnet generate --checkpoint runs/demo --prompt-file doc.txt --max-new-tokens 0 --state-out doc.state
run $B/retnet generate --checkpoint runs/demo --state-in doc.state --prompt "Q: ..." --max-new-tokens 10
run $B/retnet generate --checkpoint runs/demo --prompt "def " -n 4 --stop $'\n\n' --max-new-tokens 20
run $B/retnet export --hf runs/demo hf/demo
run $B/retnet eval --checkpoint runs/demo --tasks retnet_mc,retnet_rolling,python_mc --limit 4 --perplexity
run $B/retnet eval --checkpoint runs/demo --tasks retnet_gen --gen-kwargs max_gen_toks=16 --log-samples --output_path results/demo.json
ls results
run $B/retnet lm-eval --model retnet --model_args checkpoint=runs/demo,batch_size=8 --tasks retnet_mc,python_mc --limit 4 --output_path results/
run $B/retnet info runs/demo
run $B/retnet info --preset paper-1.3b
run $B/retnet train --out runs/demo --resume --steps 22
run $B/python -c "import retnet; m,t=retnet.load('runs/demo'); print(type(m).__name__)"
run $B/python -c "import retnet; m,t=retnet.load('hf/demo'); print(type(m).__name__)"
