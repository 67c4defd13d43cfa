#!/usr/bin/env bash
# scripts/conformance.sh [OUTDIR]
#
# Runs the OCI runtime-tools validation suite (../shared/oci-validation/run.sh)
# for husk and for runc in the same run, one after the other, and rewrites the
# generated table in docs/oci-conformance.md (between the BEGIN/END markers)
# with the per-test results of both.
#
# Knobs: HUSK (default target/release/husk), RUNC (default: runc on PATH),
# OCI_VALIDATION_* are passed through to run.sh (e.g. OCI_VALIDATION_TESTS),
# CONFORMANCE_TABLE_ONLY=1 only regenerates the table from an earlier OUTDIR.
set -euo pipefail
# Paths given by the caller are theirs: resolve them before changing directory.
absolute() { case "$1" in /*|"") printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
ARG_OUT=$(absolute "${1:-}")
[ -z "${HUSK:-}" ] || HUSK=$(absolute "$HUSK")
[ -z "${RUNC:-}" ] || RUNC=$(absolute "$RUNC")
[ -z "${OCI_VALIDATION_RUN:-}" ] || OCI_VALIDATION_RUN=$(absolute "$OCI_VALIDATION_RUN")
cd "$(dirname "$0")/.."
ROOT=$PWD
SUITE=${OCI_VALIDATION_RUN:-$ROOT/../shared/oci-validation/run.sh}
HUSK=${HUSK:-$ROOT/target/release/husk}
RUNC=${RUNC:-$(command -v runc || true)}
OUT=${ARG_OUT:-$ROOT/target/conformance}
DOC=$ROOT/docs/oci-conformance.md

[ -x "$SUITE" ] || { echo "conformance: no suite at $SUITE" >&2; exit 2; }
[ -x "$HUSK" ] || { echo "conformance: build husk first (make build)" >&2; exit 2; }
mkdir -p "$OUT"

run() { # name binary
  local rc=0
  "$SUITE" "$2" "$OUT/$1" > "$OUT/$1.log" 2>&1 || rc=$?
  if [ "$rc" -ge 2 ]; then
    echo "conformance: suite setup failed for $1 (see $OUT/$1.log)" >&2
    tail -5 "$OUT/$1.log" >&2
    exit 2
  fi
  tail -1 "$OUT/$1.log"
}

if [ "${CONFORMANCE_TABLE_ONLY:-0}" != 1 ]; then
  rm -rf "$OUT/husk" "$OUT/runc"
  echo "husk: $(run husk "$HUSK")"
  if [ -n "$RUNC" ]; then
    echo "runc: $(run runc "$RUNC")"
  else
    echo "conformance: runc not found, husk only" >&2
  fi
fi

python3 - "$OUT" "$DOC" <<'EOF'
import sys, os, datetime
out, doc = sys.argv[1], sys.argv[2]

def load(name):
    p = os.path.join(out, name, "summary.tsv")
    rows = {}
    if not os.path.exists(p):
        return rows
    with open(p) as f:
        head = f.readline().rstrip("\n").split("\t")
        for line in f:
            r = dict(zip(head, line.rstrip("\n").split("\t")))
            rows[r["test"]] = r
    return rows

def total(name):
    p = os.path.join(out, name + ".log")
    if not os.path.exists(p):
        return "not run"
    lines = [l.strip() for l in open(p) if l.strip()]
    return lines[-1] if lines else "no result"

husk, runc = load("husk"), load("runc")
def bad(r):
    # not ok lines plus results missing against the plan (crash, ERROR)
    return int(r["not_ok"] or 0) + int(r.get("missing") or 0)
def cell(r):
    if not r:
        return "-"
    return f"{r['status']} {r['ok']}/{bad(r)}"
def worse(h, r):
    if not h or not r:
        return ""
    return "**worse than runc**" if bad(h) > bad(r) else ""

lines = ["<!-- BEGIN GENERATED (scripts/conformance.sh) -->",
         f"Generated {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC by `make conformance`.",
         "",
         f"* husk: **{total('husk')}**",
         f"* runc: **{total('runc')}**",
         "",
         "| test | husk ok/not ok | runc ok/not ok | |",
         "|---|---|---|---|"]
for t in sorted(set(husk) | set(runc)):
    h, r = husk.get(t), runc.get(t)
    lines.append(f"| {t} | {cell(h)} | {cell(r)} | {worse(h, r)} |")
lines.append("<!-- END GENERATED -->")
block = "\n".join(lines) + "\n"

text = open(doc).read() if os.path.exists(doc) else "# OCI conformance\n\n"
b, e = "<!-- BEGIN GENERATED", "<!-- END GENERATED -->"
if b in text and e in text:
    pre = text[: text.index(b)]
    post = text[text.index(e) + len(e):].lstrip("\n")
    text = pre + block + ("\n" + post if post else "")
else:
    text = text.rstrip("\n") + "\n\n" + block
open(doc, "w").write(text)
print(f"conformance: table written to {doc}")
EOF
