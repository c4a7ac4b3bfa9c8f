"""Turn the ``RESULT {json}`` lines of a benchmark log into one markdown table with the ratio to
megatron-core measured in the same log (same TP, seq and batch).

    bash bench/gpu_final.sh 2>&1 | tee run.log; python bench/report.py run.log [--append BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

HEADER = ("| date | GPU | system | TP | SP | batch | seq | seq/s | TFLOP/s/GPU | MFU | peak GiB | vs megatron-core |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse(lines) -> list[dict]:
    rows = []
    for line in lines:
        if line.startswith("RESULT "):
            try:
                rows.append(json.loads(line[len("RESULT "):]))
            except json.JSONDecodeError:
                pass
    return rows


def table(rows: list[dict], date: str) -> str:
    key = lambda r: (r["tp"], r["seq"], r["batch"])  # noqa: E731
    mcore = {key(r): r["seq_per_s"] for r in rows if r.get("which") == "mcore"}
    out = [HEADER]
    for r in rows:
        name = r["which"] if r["which"] != "ours" else f"ours ({r.get('tag') or r.get('model', '')})"
        base = mcore.get(key(r))
        ratio = f"{r['seq_per_s'] / base:.2f}×" if base and r["which"] != "mcore" else ("1.00×" if base else "–")
        out.append(f"| {date} | {r.get('gpu', '?')} | {name} | {r['tp']} | {'yes' if r.get('sp') else 'no'} | "
                   f"{r['batch']} | {r['seq']} | {r['seq_per_s']} | {r['tflops_per_gpu']} | "
                   f"{100 * r['mfu_989']:.1f}% | {r['mem_gib']} | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log")
    p.add_argument("--append", help="append the table to this markdown file under a dated heading")
    a = p.parse_args(argv)
    with open(a.log) as f:
        rows = parse(f)
    if not rows:
        print(f"error: no RESULT lines in {a.log}", file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    text = table(rows, date)
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(f"\n## Run of {date} ({a.log})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
