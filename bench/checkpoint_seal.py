"""Cost of sealing a checkpoint with content hashes, as a share of the checkpoint's time (target: < 5 %).

A COLA checkpoint as ``chainlora train`` writes it, from a real model after a knot: the PEFT adapter
(``save_pretrained``), ``optimizer.pt`` (AdamW state after a step), the chain state (``save_chain_state``: the
targeted layers' base weights, the current and the tied link), ``trainer_state.json``, then every file fsync'ed:
that is "write" (not fsync'ed: the Trainer does not). The seal (``chainlora.rundir.seal_checkpoint``: fsync every
file while hashing it, xxh3-128 from the page cache, then the marker) is compared with the seal without hashes
(fsync, then a marker of sizes: what it was before), each on a freshly written checkpoint, in alternating
order: the median of their per-repetition differences is what the hashes add. Also timed alone: xxh3-128 and sha256 of every file, and
"verify", what ``--resume`` does per checkpoint (``checkpoint_problem``: hash every file, parse the trainer
state, open every safetensors header).

    python bench/checkpoint_seal.py                  # CPU: smollm2-135m, LoRA r=8 on q,v
    python bench/checkpoint_seal.py --quick          # tiny random model (smoke)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import perf, rundir, tie_knot
from chainlora.io import fsync_tree, write_json_atomic
from chainlora.state import save_chain_state


def _sha256_listing(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def _seal_without_hashes(folder: Path) -> None:
    """The seal as it was before content hashes: fsync every file, then the marker with each file's size."""
    fsync_tree(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    write_json_atomic(folder / "chainlora_complete_sizes.json", {"files": files})


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    benchlib.setup(args)
    name = benchlib.default_model(args)
    args.reps = args.reps or (2 if args.quick else 7)

    from peft import LoraConfig, get_peft_model

    model, _ = benchlib.load_model(name, "cpu", torch.float32, args.layers, args.seed)
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=benchlib.lora_targets(name)
    )
    model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = perf.adamw(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tie_knot(model, optimizer)  # the chain state now holds a tied link too
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # and AdamW has its moments again

    def write(folder: Path, step: int) -> float:
        """One checkpoint as the Trainer and chainlora's callbacks write it (no fsync: the seal does that)."""
        start = time.perf_counter()
        folder.mkdir()
        model.save_pretrained(folder)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        save_chain_state(model, folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        return time.perf_counter() - start

    def timed(fn, *args) -> float:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    root = Path(tempfile.mkdtemp(prefix="checkpoint-seal-"))
    labels = ("write", "seal", "seal without hashes", "hashes alone", "sha256 alone", "verify")
    times: dict[str, list[float]] = {label: [] for label in labels}
    sizes: dict[str, int] = {}
    try:
        for rep in range(args.reps + 1):  # the first repetition is a warm-up
            measured: dict[str, float] = {}
            seals = [("seal", rundir.seal_checkpoint), ("seal without hashes", _seal_without_hashes)]
            for i, (label, seal) in enumerate(seals if rep % 2 == 0 else reversed(seals)):
                folder = root / f"checkpoint-{2 * rep + i + 1}"
                written = write(folder, rep)
                measured[label] = timed(seal, folder)
                if label == "seal":
                    measured["write"] = written
                    sealed = folder
            hashers = [
                ("hashes alone", lambda f=sealed: rundir._listing(f, skip=(rundir.COMPLETE_MARKER,))),
                ("sha256 alone", lambda f=sealed: _sha256_listing(f)),
            ]
            for label, fn in hashers if rep % 2 == 0 else reversed(hashers):
                measured[label] = timed(fn)
            start = time.perf_counter()
            problem = rundir.checkpoint_problem(sealed, chain=True)
            measured["verify"] = time.perf_counter() - start
            assert problem is None, problem
            if rep:
                for label, seconds in measured.items():
                    times[label].append(seconds)
            sizes = {str(p.relative_to(sealed)): p.stat().st_size for p in sealed.rglob("*") if p.is_file()}
            for folder in root.iterdir():
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {label: benchlib.median(values) for label, values in times.items()}
    total = sum(sizes.values())
    checkpoint_s = med["write"] + med["seal"]
    # paired: each repetition seals two checkpoints written alike, one with hashes and one without
    added = benchlib.median([a - b for a, b in zip(times["seal"], times["seal without hashes"], strict=True)])
    share = added / checkpoint_s
    rows = [
        ["write (adapter, optimizer, chain state, trainer state)", f"{med['write'] * 1e3:,.1f}", "–"],
        [
            "seal: fsync ∥ xxh3-128 of every file, then the marker",
            f"{med['seal'] * 1e3:,.1f}",
            f"{med['seal'] / checkpoint_s:.2%}",
        ],
        ["seal without hashes (fsync, sizes: before #17)", f"{med['seal without hashes'] * 1e3:,.1f}", "–"],
        ["**added by the content hashes**", f"{added * 1e3:,.1f}", f"**{share:.2%}**"],
        [
            "xxh3-128 of every file alone (page cache)",
            f"{med['hashes alone'] * 1e3:,.1f}",
            f"{med['hashes alone'] / checkpoint_s:.2%}",
        ],
        [
            "sha256 of every file alone (not used)",
            f"{med['sha256 alone'] * 1e3:,.1f}",
            f"{med['sha256 alone'] / checkpoint_s:.2%}",
        ],
        ["verify on --resume (hash + parse)", f"{med['verify'] * 1e3:,.1f}", "–"],
    ]
    print(
        f"\n### checkpoint_seal: {name}, LoRA r={args.rank}, checkpoint {total / 2**20:,.1f} MiB, {args.reps} reps"
    )
    print(benchlib.markdown_table(["", "ms (median)", "share of the checkpoint"], rows))
    print(
        f"\nxxh3-128: {total / med['hashes alone'] / 2**30:.2f} GiB/s; sha256: "
        f"{total / med['sha256 alone'] / 2**30:.2f} GiB/s; the hashes add {share:.2%} to a checkpoint "
        "(target < 5 %)"
    )
    results = {
        "model": name,
        "rank": args.rank,
        "reps": args.reps,
        "file_bytes": sizes,
        "seconds": times,
        "medians": med,
        "added_seconds": added,
        "hash_share": share,
        "target_met": share < 0.05,
    }
    benchlib.write_results("checkpoint_seal", args, results)
    return results


if __name__ == "__main__":
    main()
