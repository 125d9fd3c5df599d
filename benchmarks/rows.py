"""The records every measurement returns: a row per thing timed, a stage dict around the rows, and
an exception turned into the one-line reason a skipped row or stage carries."""
from __future__ import annotations


def row(name: str, **kw) -> dict:
    r = {"name": name}
    r.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()})
    return r


def skipped_row(name: str, reason: str, **kw) -> dict:
    return row(name, status="skipped", reason=reason, **kw)


def ok_stage(rows, notes=None) -> dict:
    out = {"status": "ok", "rows": rows}
    if notes:
        out["notes"] = notes
    return out


def skip_stage(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "rows": []}


def err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
