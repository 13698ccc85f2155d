"""Judge a pip-audit JSON report (`pip-audit --format json`): exit 1 on a known vulnerability with a
fix available, or on any package that could not be audited (an unreachable vulnerability service
must not pass as "no known vulnerabilities"); vulnerabilities without a fix are listed only."""
from __future__ import annotations

import json
import os
import sys


def judge(report: dict) -> tuple[int, list[str]]:
    fixable, unfixed, skipped = [], [], []
    for dep in report.get("dependencies", []):
        if dep.get("skip_reason"):
            skipped.append(f"  {dep['name']}: {dep['skip_reason']}")
            continue
        for v in dep.get("vulns", []):
            line = f"  {dep['name']} {dep['version']}: {v['id']}"
            if v.get("fix_versions"):
                fixable.append(f"{line} (fixed in {', '.join(v['fix_versions'])})")
            else:
                unfixed.append(f"{line} (no fix released)")
    lines = []
    if fixable:
        lines += [f"{len(fixable)} known vulnerabilities with a fix available: upgrade", *fixable]
    if unfixed:
        lines += [f"{len(unfixed)} known vulnerabilities without a fix (not failing)", *unfixed]
    if skipped:
        lines += [f"{len(skipped)} packages could not be audited (is the vulnerability service reachable?)",
                  *skipped]
    audited = len(report.get("dependencies", [])) - len(skipped)
    if not (fixable or skipped):
        lines.append(f"{audited} packages audited: no known vulnerability with a fix available")
    return (1 if fixable or skipped else 0), lines


def main(path: str) -> int:
    if not os.path.isfile(path):
        print(f"{path}: no report: pip-audit did not finish (its error is above)")
        return 1
    with open(path) as f:
        code, lines = judge(json.load(f))
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
