"""qemu-img as argument lists with timeouts; its ``--output=json`` parsed, never its text.

Each function is synchronous and meant for the storage executor. Formats are always passed
explicitly (``-f``/``-F``/``-O``) except where probing is the point (import of an unknown
file), so guest-written data can never make QEMU reinterpret a raw disk as qcow2 with a
backing file pointing at a host file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from cna_agent.contracts import ImageSource
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.storage.runner import CommandError, CommandRunner

QEMU_IMG = "qemu-img"
#: Exit status of ``qemu-img check`` for formats without a checker (raw, vpc).
CHECK_UNSUPPORTED = 63
#: vmdk create types that keep descriptor and data in one file.
SELF_CONTAINED_VMDK = ("streamOptimized", "monolithicSparse")


def source_args(src: str | ImageSource, fmt: str | None) -> list[str]:
    """qemu-img's arguments naming an image: ``[-f FMT] PATH``, or for bytes inside a file (a
    disk stored in an OVA) ``--image-opts`` with QEMU's raw driver windowing the file (offset,
    size) under the format driver, so nothing is extracted first. Without ``fmt`` the format
    is probed inside the window."""
    if isinstance(src, str):
        return (["-f", fmt] if fmt else []) + [src]
    if not src.offset and not src.length:
        return (["-f", fmt] if fmt else []) + [src.path]
    name = src.path.replace(",", ",,")  # QemuOpts escapes a comma by doubling it
    opts = f"file.driver=raw,file.offset={src.offset},file.file.driver=file,file.file.filename={name}"
    if src.length:
        opts = f"file.size={src.length}," + opts
    return ["--image-opts", (f"driver={fmt}," if fmt else "") + opts]


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str = ""
    backing_format: str = ""
    dirty: bool = False
    #: qcow2 "data-file" (external data file): refused on import, like a backing file.
    data_file: str = ""
    corrupt: bool = False
    #: vmdk: the create type ("streamOptimized", "monolithicSparse", "monolithicFlat", ...) and
    #: the files its extents name (a descriptor file can name any host file).
    create_type: str = ""
    extents: tuple[str, ...] = ()
    raw: dict[str, Any] | None = None

    @property
    def self_contained_vmdk(self) -> bool:
        """A vmdk whose data is in the image itself: the single-file create types. Any other
        (monolithicFlat, twoGbMaxExtent*, vmfs, ...) is a descriptor naming extent files,
        which on import would read whatever host file it names."""
        return self.create_type in SELF_CONTAINED_VMDK and len(self.extents) <= 1


@dataclass(frozen=True)
class CheckReport:
    supported: bool
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    #: Corruptions qemu-img could not repair / leaks it fixed (only with repair; we never repair).
    summary: str = ""

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.check_errors == 0


def _json(text: str, argv: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"{argv}: unexpected output (not JSON: {exc})") from None
    if not isinstance(data, dict):
        raise FailedPrecondition(f"{argv}: unexpected JSON output")
    return data


def info(runner: CommandRunner, path: str | ImageSource, *, fmt: str | None = None, timeout: float = 60.0,
         force_share: bool = True) -> ImageInfo:
    """``qemu-img info --output=json`` (``-U`` so images in use by a running VM can be read)."""
    argv = [QEMU_IMG, "info", "--output=json"]
    if force_share:
        argv.append("-U")
    argv += source_args(path, fmt)
    data = _json(runner.run(argv, timeout=timeout).stdout, " ".join(argv))
    specific = (data.get("format-specific") or {}).get("data") or {}
    extents = specific.get("extents") or []
    return ImageInfo(
        format=str(data.get("format", "")),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        backing_filename=str(data.get("full-backing-filename") or data.get("backing-filename") or ""),
        backing_format=str(data.get("backing-filename-format", "")),
        dirty=bool(data.get("dirty-flag", False)),
        data_file=str(specific.get("data-file", "") or ""),
        corrupt=bool(specific.get("corrupt", False)),
        create_type=str(specific.get("create-type", "") or ""),
        extents=tuple(str(e.get("filename", "")) for e in extents if isinstance(e, dict)),
        raw=data,
    )


def check(runner: CommandRunner, path: str | ImageSource, fmt: str, *, timeout: float) -> CheckReport:
    """``qemu-img check --output=json`` without repair; exit 2 = corruptions, 3 = leaks."""
    argv = [QEMU_IMG, "check", "--output=json", "-U", *source_args(path, fmt)]
    result = runner.run(argv, timeout=timeout, check=False)
    if result.returncode == CHECK_UNSUPPORTED:
        return CheckReport(supported=False, summary=f"{fmt} images have no consistency checker")
    if result.returncode not in (0, 2, 3) or not result.stdout.strip():
        # 1 = the check itself could not run (e.g. an unreadable header): treat as corrupt.
        tail = (result.stderr or result.stdout).strip()[-800:]
        return CheckReport(supported=True, check_errors=1, summary=f"check could not complete: {tail}")
    data = _json(result.stdout, " ".join(argv))
    corruptions = int(data.get("corruptions", 0)) + int(data.get("corruptions-fixed", 0) or 0)
    leaks = int(data.get("leaks", 0))
    errors = int(data.get("check-errors", 0))
    parts = []
    if corruptions:
        parts.append(f"{corruptions} corrupt cluster(s)")
    if leaks:
        parts.append(f"{leaks} leaked cluster(s) (harmless, wastes space)")
    if errors:
        parts.append(f"{errors} check error(s)")
    return CheckReport(supported=True, corruptions=corruptions, leaks=leaks, check_errors=errors,
                       summary="; ".join(parts) or "no errors")


def create(runner: CommandRunner, path: str, fmt: str, size: int | None, *, preallocate: bool = False,
           backing: str = "", backing_fmt: str = "", timeout: float) -> None:
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    opts = []
    if preallocate:
        opts.append("preallocation=" + ("falloc" if fmt == "raw" else "metadata"))
    if backing:
        argv += ["-b", backing, "-F", backing_fmt]
    if fmt == "qcow2":
        opts.append("compat=1.1")
    if opts:
        argv += ["-o", ",".join(opts)]
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    runner.run(argv, timeout=timeout)


def resize(runner: CommandRunner, path: str, fmt: str, size: int, *, preallocate: bool = False, timeout: float) -> None:
    argv = [QEMU_IMG, "resize", "-q", "-f", fmt]
    if preallocate:
        argv.append("--preallocation=falloc")
    argv += [path, str(size)]
    runner.run(argv, timeout=timeout)


def convert(runner: CommandRunner, src: str | ImageSource, src_fmt: str, dst: str, dst_fmt: str, *, timeout: float,
            on_progress: Callable[[float], None], preallocate: bool = False, target_exists: bool = False,
            subformat: str = "") -> None:
    """Copy ``src`` into ``dst`` converting formats; ``-p`` progress goes to ``on_progress``.
    ``subformat``: vmdk's (``streamOptimized`` for OVF packages)."""
    opts = []
    if dst_fmt == "qcow2":
        opts.append("compat=1.1")
    if subformat and dst_fmt == "vmdk":
        opts.append(f"subformat={subformat}")
    if preallocate and dst_fmt in ("raw", "qcow2"):
        opts.append("preallocation=" + ("falloc" if dst_fmt == "raw" else "metadata"))
    argv = [QEMU_IMG, "convert", "-p", "-U", "-O", dst_fmt]
    if opts and not target_exists:
        argv += ["-o", ",".join(opts)]
    if target_exists:
        argv.append("-n")
    argv += [*source_args(src, src_fmt), dst]
    try:
        runner.run_progress(argv, timeout=timeout, on_progress=on_progress)
    except CommandError as exc:
        raise FailedPrecondition(f"conversion failed: {exc.message}") from None


def probe_format(runner: CommandRunner, path: str | ImageSource, field: str, *, timeout: float) -> ImageInfo:
    """Probe an import source; unreadable or unknown images are refused naming ``field``."""
    try:
        return info(runner, path, timeout=timeout)
    except CommandError as exc:
        raise InvalidArgument(field, f"not a readable disk image: {exc.result.stderr.strip()[-500:]}") from None
