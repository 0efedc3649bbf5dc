"""Tally the bad-input cases for the docs table: ``python -m tests.reliability.tally``.

Runs every case of test_bad_inputs.py (CLI) and counts, per column of docs/reliability.md:
tracebacks, wrong exit codes (vs the README table), not exactly one ``error:`` line, inputs
modified (a byte of the work folder or a shared fixture changed) and partial or stray outputs
(anything new in the work folder). Cases needing the tiny SD1.5 export build it once.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


class _Request:
    """Enough of pytest's ``request`` for Ctx: the tiny export, built once."""

    _sd15: Path | None = None

    def getfixturevalue(self, name: str) -> Path:
        assert name == "tiny_sd15_onnx", name
        if _Request._sd15 is None:
            from sdgraph.demo import build_demo_pipeline
            from sdgraph.export import export_pipeline

            root = Path(tempfile.mkdtemp(prefix="tally-"))
            export_pipeline(build_demo_pipeline(root / "p", "sd15", "tiny", seed=0), root / "onnx")
            _Request._sd15 = root / "onnx"
        return _Request._sd15


def main(argv: list[str]) -> int:
    """``--subprocess``: every case through ``python -m sdgraph`` (works on trees older than run_app);
    ``--skip N``: start at case N; ``--only ID,ID``: just these cases."""
    from tests.reliability.support import invoke, tree_state
    from tests.reliability.test_bad_inputs import CASES, Ctx

    cols = {"kinds": 0, "tracebacks": 0, "wrong exit code": 0, "not one error line": 0,
            "inputs modified": 0, "partial or stray output": 0}
    skip = int(argv[argv.index("--skip") + 1]) if "--skip" in argv else 0  # resume a long --subprocess run
    only = set(argv[argv.index("--only") + 1].split(",")) if "--only" in argv else None
    for cid, code, _match, build in CASES[skip:]:
        if only is not None and cid not in only:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"case-{cid}-"))
        ctx = Ctx(tmp, _Request())
        built = build(ctx)
        args, opts = built if isinstance(built, tuple) else (built, {})
        before = tree_state(tmp, *ctx.shared)
        if "--subprocess" in argv:
            opts = {**opts, "subprocess_run": True}
        res = invoke(args, **opts)
        after = tree_state(tmp, *ctx.shared)
        cols["kinds"] += 1
        bad = []
        if "Traceback" in res.stdout + res.stderr:
            cols["tracebacks"] += 1
            bad.append("traceback")
        if res.code != code:
            cols["wrong exit code"] += 1
            bad.append(f"exit {res.code} != {code}")
        if len(res.error_lines) != 1:
            cols["not one error line"] += 1
            bad.append(f"{len(res.error_lines)} error lines")
        if any(after.get(k) != v for k, v in before.items()):
            cols["inputs modified"] += 1
            bad.append("input modified")
        if set(after) - set(before):
            cols["partial or stray output"] += 1
            bad.append("output written")
        print(f"{cid:45s} {'ok' if not bad else '; '.join(bad)}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)  # each case's work folder: nothing left in /tmp
    print(" | ".join(f"{k}: {v}" for k, v in cols.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
