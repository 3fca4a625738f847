"""Writes a single-layer OCI image archive (an OCI image layout in a tar),
deterministically: the same inputs give the same bytes, so the same digests.

Called by tests/images/busybox-oci (read it first):

    /usr/bin/python3 oci_image.py --busybox PATH --name REF \
        [--user U] [--workdir DIR] [--env K=V]... --out OUT.tar

The layer: PATH as /bin/busybox, a symlink per applet (`busybox
--list-full`, except `busybox` itself: that link would replace the binary),
/etc/passwd and /etc/group (root, user 1000:1000, nobody), /tmp and
/var/tmp (1777), /root, /home/user (owned by 1000:1000). Every tar entry is
sorted by name, with mtime 0 and no user or group names; gzip without a
timestamp or file name. The image's config: PATH, Cmd ["sh"], amd64/linux;
--user and --workdir add User and WorkingDir, each --env K=V is appended
to Env after PATH in the order given (--env PATH=... replaces PATH's value
in place; a name given twice is an error). Without them the config is
byte for byte what it was before they existed (its keys are sorted, and
absent ones are not written).
With --pause PATH instead of --busybox (tests/images/pause-oci): the layer
is PATH alone, as /pause (0755), and the config's Entrypoint is ["/pause"]:
the pod sandbox image containerd's CRI runs as each pod's first container.
The index names the image twice: `io.containerd.image.name` = REF (what
`ctr image import` names it) and `org.opencontainers.image.ref.name` = its
tag (the OCI layout's own name).

The archive also has a `manifest.json` (Docker's archive format), as
`docker save` writes beside an OCI layout since Docker 25: `docker load`
reads only that file (without it, it looks for the pre-1.10 format and
fails with "open .../blobs/json: no such file"). It names the same config
and layer blobs, and REF as the image's RepoTags, so `ctr image import`
(which reads both and finds the same image under the same name) and
`docker load` give the same image.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = b"""root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = b"""root:x:0:
audio:x:29:user
video:x:44:user
user:x:1000:
nogroup:x:65534:
"""

# Directories of the layer: name -> (mode, uid/gid).
DIRS = {
    "bin": (0o755, 0),
    "dev": (0o755, 0),
    "etc": (0o755, 0),
    "home": (0o755, 0),
    "home/user": (0o755, 1000),
    "proc": (0o555, 0),
    "root": (0o700, 0),
    "run": (0o755, 0),
    "sbin": (0o755, 0),
    "sys": (0o555, 0),
    "tmp": (0o1777, 0),
    "usr": (0o755, 0),
    "usr/bin": (0o755, 0),
    "usr/sbin": (0o755, 0),
    "var": (0o755, 0),
    "var/tmp": (0o1777, 0),
}


def is_static_elf(path):
    """True when PATH is an ELF executable without a program interpreter."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def tar_info(name, kind, mode, uid=0, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = info.gid = uid
    info.uname = info.gname = ""
    info.mtime = 0
    info.size = size
    info.linkname = linkname
    return info


def build_tar(entries):
    """A tar of ENTRIES [(TarInfo, bytes or None)], sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in sorted(entries, key=lambda e: e[0].name):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def layer(busybox):
    with open(busybox, "rb") as f:
        binary = f.read()
    listing = subprocess.run(
        [busybox, "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    entries = {}
    for name, (mode, owner) in DIRS.items():
        entries[name] = (tar_info(name, tarfile.DIRTYPE, mode, owner), None)
    entries["bin/busybox"] = (
        tar_info("bin/busybox", tarfile.REGTYPE, 0o755, size=len(binary)),
        binary,
    )
    applets = 0
    for applet in sorted(set(listing.split())):
        applet = applet.strip("/")
        if os.path.basename(applet) == "busybox" or applet in entries:
            continue
        parent = os.path.dirname(applet)
        if parent and parent not in entries:
            raise SystemExit(f"oci_image: applet {applet} in a directory the layer lacks")
        entries[applet] = (tar_info(applet, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"), None)
        applets += 1
    for name, data in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
        entries[name] = (tar_info(name, tarfile.REGTYPE, 0o644, size=len(data)), data)
    return build_tar(list(entries.values())), applets


def pause_layer(pause):
    with open(pause, "rb") as f:
        binary = f.read()
    info = tar_info("pause", tarfile.REGTYPE, 0o755, size=len(binary))
    return build_tar([(info, binary)])


def gzip_bytes(data):
    buf = io.BytesIO()
    # No name, mtime 0, a fixed level: the same bytes every time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_name(data):
    """The archive's path of blob DATA."""
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


def tag_of(ref):
    """The tag of REF (`latest` when it has none)."""
    last = ref.rsplit("/", 1)[-1]
    if "@" in last:
        raise SystemExit(f"oci_image: {ref}: a digest reference cannot name an image")
    return last.split(":", 1)[1] if ":" in last else "latest"


def image_env(extra):
    """The config's Env: PATH, then EXTRA (["K=V", ...]) in order."""
    env = [PATH_ENV]
    seen = set()
    for item in extra:
        key, sep, _ = item.partition("=")
        if not key or not sep or "\n" in item:
            raise SystemExit(f"oci_image: --env {item!r}: not K=V")
        if key in seen:
            raise SystemExit(f"oci_image: --env {key} given twice")
        seen.add(key)
        if key == "PATH":
            env[0] = item
        else:
            env.append(item)
    return env


def image_config(args):
    """The config's `config` object: Env and Cmd, User and WorkingDir when given."""
    config = {"Env": image_env(args.env), "Cmd": ["sh"]}
    if args.user is not None:
        if not args.user or "\n" in args.user:
            raise SystemExit(f"oci_image: --user {args.user!r}: empty or holds a newline")
        config["User"] = args.user
    if args.workdir is not None:
        if not args.workdir.startswith("/") or "\n" in args.workdir:
            raise SystemExit(f"oci_image: --workdir {args.workdir!r}: not an absolute path")
        config["WorkingDir"] = args.workdir
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--busybox")
    source.add_argument("--pause")
    parser.add_argument("--name", required=True)
    parser.add_argument("--user")
    parser.add_argument("--workdir")
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    binary = args.busybox or args.pause
    if not is_static_elf(binary):
        raise SystemExit(f"oci_image: {binary} is not a static 64-bit ELF executable")
    if args.pause:
        if args.user or args.workdir or args.env:
            raise SystemExit("oci_image: --pause takes no --user, --workdir or --env")
        config_object = {"Entrypoint": ["/pause"]}
        layer_tar, what = pause_layer(args.pause), "pause"
    else:
        config_object = image_config(args)
        layer_tar, applets = layer(args.busybox)
        what = f"{applets} applets"
    layer_gz = gzip_bytes(layer_tar)
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config_object,
            "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "isola tests/images/" + ("pause-oci" if args.pause else "busybox-oci")}],
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(layer_gz),
                    "size": len(layer_gz),
                }
            ],
        }
    )
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": args.name,
                        "org.opencontainers.image.ref.name": tag_of(args.name),
                    },
                }
            ],
        }
    )
    layout = canonical_json({"imageLayoutVersion": "1.0.0"})
    docker_manifest = canonical_json(
        [
            {
                "Config": blob_name(config),
                "RepoTags": [args.name],
                "Layers": [blob_name(layer_gz)],
            }
        ]
    )

    entries = [
        (tar_info("blobs", tarfile.DIRTYPE, 0o755), None),
        (tar_info("blobs/sha256", tarfile.DIRTYPE, 0o755), None),
        (tar_info("index.json", tarfile.REGTYPE, 0o644, size=len(index)), index),
        (tar_info("manifest.json", tarfile.REGTYPE, 0o644, size=len(docker_manifest)), docker_manifest),
        (tar_info("oci-layout", tarfile.REGTYPE, 0o644, size=len(layout)), layout),
    ]
    for blob in (layer_gz, config, manifest):
        name = blob_name(blob)
        entries.append((tar_info(name, tarfile.REGTYPE, 0o644, size=len(blob)), blob))
    archive = build_tar(entries)
    tmp = f"{args.out}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(archive)
    os.replace(tmp, args.out)
    print(
        f"oci_image: {args.out}: {args.name}, {what}, "
        f"manifest {digest(manifest)}, {len(archive)} bytes",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
