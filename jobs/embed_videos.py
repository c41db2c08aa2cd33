"""Entry point for `ray job submit -- python jobs/embed_videos.py --input ... --output ...`.

Thin on purpose: the same command as `vmae-ray embed`. Works from a checkout without
installing the package (`--working-dir .` ships the repository to the cluster).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmae_ray.cli import run_embed  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_embed(sys.argv[1:], prog="jobs/embed_videos.py"))
