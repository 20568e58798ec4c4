#!/usr/bin/env bash
# Runs the Dockerfile's build stages without a Docker engine, so that a broken image build fails
# CI: the WORKDIR, COPY and RUN lines of every stage but the last (the runtime stage, which only
# installs packages into the system) are read from the Dockerfile itself and run in the same
# order, in a scratch folder holding only the files those COPY lines name. The runtime stage's
# COPY sources are checked to exist. Any other instruction in a build stage stops the script:
# the two cannot drift apart silently.
#
# Each stage gets its own root under the scratch folder (`/app` becomes `STAGE_ROOT/app`), a
# stage built `FROM` an earlier one starts from a copy of it, and `COPY --from=STAGE` reads that
# stage's root. Cargo's target folder is the one thing kept between runs: every stage's
# `WORKDIR/target` is a link to $IMAGE_BUILD_TARGET, by default outside the checkout
# (~/.cache/mqtt-connector/image-build-target) because CI runs each time in a fresh clone: on a
# machine that ran it before, a run rebuilds only this crate (~1.5 min here), not its release
# dependencies (~4 min more, plus ~1.5 min to install cargo-chef, on a new machine).
#
# Usage: bash .ci/image-build.sh [DOCKERFILE]     (default: the repository's Dockerfile)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dockerfile=${1:-$repo/Dockerfile}
export IMAGE_BUILD_TARGET=${IMAGE_BUILD_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-connector/image-build-target}
# Outside the checkout, as /app is in the image: inside it, cargo would look up the repository's
# own Cargo.toml as a possible workspace root.
if [ -z "${IMAGE_BUILD_SCRATCH:-}" ]; then
    IMAGE_BUILD_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/mqtt-connector-image-build.XXXXXX")
    trap 'rm -rf "$IMAGE_BUILD_SCRATCH"' EXIT
fi
export IMAGE_BUILD_SCRATCH
# The Dockerfile's own target folder is `target/` in its WORKDIR: an inherited CARGO_TARGET_DIR
# would send the build elsewhere and the runtime stage's COPY would find nothing.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR

python3 - "$repo" "$dockerfile" <<'PY'
import os, shlex, shutil, subprocess, sys, time

repo, dockerfile = sys.argv[1], sys.argv[2]
target = os.environ["IMAGE_BUILD_TARGET"]
scratch = os.environ["IMAGE_BUILD_SCRATCH"]
started = time.monotonic()


def fail(message):
    print(f"image-build: {message}", file=sys.stderr)
    sys.exit(1)


def instructions(path):
    """(line number, INSTRUCTION, arguments) of the Dockerfile, continuations joined."""
    out, pending, first = [], "", 0
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if pending and stripped.startswith("#"):
                continue  # Docker drops comment lines inside a continued instruction
            if not pending:
                first = number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            pending += line
            word, _, rest = pending.strip().partition(" ")
            out.append((first, word.upper(), rest.strip()))
            pending = ""
    if pending:
        fail(f"{path}: the instruction at line {first} ends with a continuation")
    return out


def stages(steps):
    """[(name, base, [(line, INSTRUCTION, args)])] in file order."""
    result = []
    for number, word, rest in steps:
        if word == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"stage{len(result)}"
            result.append((name, parts[0], []))
        elif not result:
            if word not in ("ARG",):
                fail(f"line {number}: {word} before the first FROM")
        else:
            result[-1][2].append((number, word, rest))
    return result


def rooted(root, path):
    """An absolute path of a stage's filesystem, inside that stage's scratch root."""
    return os.path.join(root, path.lstrip("/"))


def copy_sources(number, rest):
    words = shlex.split(rest)
    source_stage = None
    flags = [w for w in words if w.startswith("--")]
    for flag in flags:
        if flag.startswith("--from="):
            source_stage = flag.split("=", 1)[1]
        elif not flag.startswith(("--chown=", "--chmod=", "--link")):
            fail(f"line {number}: COPY {flag} is not understood by this script")
    paths = [w for w in words if not w.startswith("--")]
    if len(paths) < 2:
        fail(f"line {number}: COPY needs a source and a destination")
    return source_stage, paths[:-1], paths[-1]


def copy(src, dest, dest_is_dir):
    if os.path.isdir(src):
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    else:
        if dest_is_dir:
            os.makedirs(dest, exist_ok=True)
            dest = os.path.join(dest, os.path.basename(src))
        else:
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        shutil.copy2(src, dest)


all_stages = stages(instructions(dockerfile))
if len(all_stages) < 2:
    fail("expected build stages followed by a runtime stage")
build_stages, runtime = all_stages[:-1], all_stages[-1]
roots = {}

# Files from the build context are checked before anything runs: a COPY of a missing path
# fails in seconds, not after the build.
for name, _, steps in all_stages:
    for number, word, rest in steps:
        if word == "COPY":
            source_stage, sources, _ = copy_sources(number, rest)
            for source in sources:
                if source_stage is None and not os.path.exists(os.path.join(repo, source)):
                    fail(f"line {number}: COPY {source}: no such file or folder in the build context")

shutil.rmtree(scratch, ignore_errors=True)
os.makedirs(target, exist_ok=True)

for name, base, steps in build_stages:
    root = os.path.join(scratch, name)
    if base in roots:
        shutil.copytree(roots[base]["root"], root, symlinks=True)
        workdir = roots[base]["workdir"]
    else:
        os.makedirs(root)
        workdir = "/"
    roots[name] = {"root": root, "workdir": workdir}
    print(f"image-build: stage {name} (FROM {base})", flush=True)
    for number, word, rest in steps:
        cwd = rooted(root, workdir)
        if word == "WORKDIR":
            workdir = os.path.join(workdir, rest)
            roots[name]["workdir"] = workdir
            cwd = rooted(root, workdir)
            os.makedirs(cwd, exist_ok=True)
            link = os.path.join(cwd, "target")
            if not os.path.lexists(link):
                os.symlink(target, link)
        elif word == "COPY":
            source_stage, sources, dest = copy_sources(number, rest)
            if source_stage is not None and source_stage not in roots:
                fail(f"line {number}: COPY --from={source_stage}: no earlier build stage of that name")
            dest_path = dest if dest.startswith("/") else os.path.join(workdir, dest)
            dest_is_dir = dest.endswith("/") or len(sources) > 1
            for source in sources:
                if source_stage is None:
                    src = os.path.normpath(os.path.join(repo, source))
                    if not (src == repo or src.startswith(repo + os.sep)):
                        fail(f"line {number}: COPY {source} leaves the build context")
                else:
                    src = rooted(roots[source_stage]["root"], source)
                if not os.path.exists(src):
                    fail(f"line {number}: COPY {source}: no such file or folder")
                copy(src, rooted(root, dest_path), dest_is_dir)
            print(f"image-build:   line {number}: COPY {rest}", flush=True)
        elif word == "RUN":
            print(f"image-build:   line {number}: RUN {rest}", flush=True)
            step_started = time.monotonic()
            status = subprocess.run(["sh", "-c", rest], cwd=cwd).returncode
            took = time.monotonic() - step_started
            if status != 0:
                fail(f"line {number}: RUN failed with status {status} after {took:.1f} s")
            print(f"image-build:   line {number}: {took:.1f} s", flush=True)
        else:
            fail(f"line {number}: {word} in build stage {name} is not run by this script; "
                 "add it to .ci/image-build.sh or move it to the runtime stage")

# The runtime stage runs as root on a Debian image (apt-get, useradd): not run here, but every
# file it copies must exist, from the build context or from a build stage.
for number, word, rest in runtime[2]:
    if word != "COPY":
        continue
    source_stage, sources, _ = copy_sources(number, rest)
    for source in sources:
        if source_stage is None:
            src = os.path.join(repo, source)
        elif source_stage in roots:
            workdir = roots[source_stage]["workdir"]
            src = rooted(roots[source_stage]["root"],
                         source if source.startswith("/") else os.path.join(workdir, source))
        else:
            fail(f"line {number}: COPY --from={source_stage}: no build stage of that name")
        if not os.path.exists(src):
            fail(f"line {number}: runtime COPY {source}: no such file or folder")
    print(f"image-build: runtime line {number}: COPY {rest}: sources present", flush=True)

print(f"image-build: ok in {time.monotonic() - started:.1f} s", flush=True)
PY
