"""Build guard: exit 1 unless the installed torch is a CUDA build (of the expected version).

Runs during `docker build`, where no GPU is visible, so it checks how torch was compiled,
not whether a device works (that is `bundleflow doctor`). Usage:

    python scripts/check_torch_cuda.py [EXPECTED_CUDA]      # e.g. 12.1
"""

from __future__ import annotations

import sys


def check(expected: str | None) -> list[str]:
    """Problems with the installed torch build (empty when it is the CUDA build we want)."""
    import torch

    problems = []
    cuda = torch.version.cuda
    if not torch.cuda._is_compiled() or cuda is None:
        problems.append(
            f"torch {torch.__version__} is not a CUDA build (torch.version.cuda={cuda}); "
            "install the +cuXXX wheel from https://download.pytorch.org/whl/cuXXX "
            "(never let an installer pick the backend at build time: there is no GPU there)"
        )
    elif expected and cuda != expected:
        problems.append(
            f"torch {torch.__version__} is built for CUDA {cuda}, expected {expected}; "
            "the CUDA_FLAVOUR build argument and docker/requirements/ disagree"
        )
    return problems


def main(argv: list[str]) -> int:
    expected = argv[0] if argv else None
    problems = check(expected)
    for problem in problems:
        print(f"check_torch_cuda: FAIL: {problem}", file=sys.stderr)
    if problems:
        return 1
    import torch

    print(f"check_torch_cuda: ok: torch {torch.__version__}, CUDA {torch.version.cuda}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
