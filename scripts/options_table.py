"""Prints the README's configuration table from the option definitions (run after changing options)."""

from sidecar.config import OPTIONS


def fmt_default(opt) -> str:  # type: ignore[no-untyped-def]
    if opt.kind == "negbool":
        return f"{opt.dest} on"
    if opt.default is None:
        return "see description"
    if opt.kind == "bytes":
        v = opt.default
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if v % size == 0:
                return f"{v // size} {unit}"
    if opt.kind == "duration":
        return f"{int(opt.default)} s" if opt.default % 3600 else f"{int(opt.default // 3600)}h"
    return f"`{opt.default}`"


print("| flag | environment | default | meaning |")
print("|---|---|---|---|")
for o in OPTIONS:
    print(f"| `{o.flag}` | `{o.env}` | {fmt_default(o)} | {o.help} |")
print("| | `REDIS_PASSWORD` | none | Redis password (kept out of the URL and out of `ps`) |")
