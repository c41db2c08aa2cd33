"""Older revisions' code, as the benches run it beside this checkout's, made to run on the
packages installed today. Each entry is one textual fix, named for the package change it
follows; nothing else of the old code changes.
"""

from __future__ import annotations

# PyAV 18.1.1 made a frame's side-data container a true Mapping: iterating it yields the
# side-data types, not the SideData objects older code iterated (see
# vmae_ray.decoding.side_data_of).
PYAV_SIDE_DATA = (
    "for side_data in frame.side_data:",
    "for side_data in (frame.side_data[t] if isinstance(t, SideDataType) else t for t in frame.side_data):",
)

FIXES = {"vmae_ray/decoding.py": (PYAV_SIDE_DATA,)}


def on_current_packages(rel_path: str, source: str) -> str:
    """``source`` (the file ``rel_path`` of an older revision) with the `FIXES` for it applied."""
    for old, new in FIXES.get(rel_path, ()):
        source = source.replace(old, new)
    return source


def fix_checkout(root: str) -> None:
    """Apply `FIXES` in place to an older revision's checkout at ``root`` (idempotent)."""
    import os

    for rel_path in FIXES:
        path = os.path.join(root, rel_path)
        if os.path.exists(path):
            with open(path) as f:
                source = f.read()
            fixed = on_current_packages(rel_path, source)
            if fixed != source:
                with open(path, "w") as f:
                    f.write(fixed)
