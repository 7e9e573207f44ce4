"""rembg in a process of its own, driven line by line: the peers suite's in-process rembg.

Run by rembg's own Python (rembg pins older fastapi/uvicorn than this project,
so it usually lives in a virtual environment of its own): it imports rembg and
nothing of this project. Each request is one JSON line on stdin; each answer
one JSON line on stdout, prefixed with ``@@`` (rembg prints to stdout too).

    {"op": "load", "model": "u2netp"}                      -> {"ok": true, "ms": ...}
    {"op": "remove", "src": PATH, "dst": PATH, "dc": false} -> {"ok": true, "ms": ...}
    {"op": "rss"}                                          -> {"ok": true, "rss_mb": ..., "peak_mb": ...}
    {"op": "quit"}

``remove`` is timed as a user's script would run it: read the file, rembg's
``remove`` (decode, infer, cutout, PNG encode), write the PNG.
"""
import json
import sys
import time

PREFIX = "@@"


def _memory() -> dict:
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024.0
    return {"rss_mb": values.get("VmRSS"), "peak_mb": values.get("VmHWM")}


def main() -> int:
    sessions = {}
    remove = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            start = time.perf_counter()
            if op == "quit":
                break
            if op == "load":
                from rembg import new_session, remove

                sessions[req["model"]] = new_session(req["model"])
                answer = {}
            elif op == "remove":
                with open(req["src"], "rb") as fh:
                    data = fh.read()
                out = remove(data, session=sessions[req["model"]], decontaminate=bool(req.get("dc")))
                with open(req["dst"], "wb") as fh:
                    fh.write(out)
                answer = {}
            elif op == "rss":
                answer = _memory()
            else:
                raise ValueError(f"unknown op {op!r}")
            answer.update(ok=True, ms=(time.perf_counter() - start) * 1000.0)
        except Exception as exc:  # reported to the suite, which says which contender failed and why
            answer = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        sys.stdout.write(PREFIX + json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
