"""Extract a tarball from the internet without letting any member land outside the target.

Every member is checked before anything is written: only regular files and folders, no
absolute names, no `..`, no symbolic or hard links, no devices or FIFOs, and the resolved
path must stay inside the target. Extraction then also goes through tarfile's own "data"
filter (PEP 706), a second, independent guard.
"""
import os
import tarfile
import zlib

from rpo.cli import UserError


def unsafe_reason(member, dest):
    """Why `member` must not be extracted into `dest`, or None if it is safe."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or os.path.isabs(member.name) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "contains '..'"
    if member.issym() or member.islnk():
        return "is a link"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or folder (device, FIFO...)"
    root = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        return "resolves outside the target folder"
    return None


def safe_extract(tar_path, dest):
    """Extract `tar_path` (any compression tarfile reads) into `dest`; refuse unsafe archives."""
    os.makedirs(dest, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = unsafe_reason(member, dest)
                if reason:
                    raise UserError(f"refusing to extract {tar_path}: member {member.name!r} {reason}")
            tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as e:
        raise UserError(f"refusing to extract {tar_path}: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read archive {tar_path} (corrupt or incomplete download?): {e}") from None
