#!/usr/bin/env bash
# tagged.sh TAG COMMAND...: runs COMMAND with every line of its output (stderr too) prefixed by
# "[TAG] ", and exits with COMMAND's status. `make test` runs two pytest runs side by side on one
# terminal: whole lines, each saying whose it is, instead of two runs' characters interleaved.
set -o pipefail
tag=$1
shift
"$@" 2>&1 | sed -u "s/^/[$tag] /"
