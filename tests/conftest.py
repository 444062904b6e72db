# Import jang_serve first: it gives MLX a fast BLAS, which works only before MLX is loaded.
import jang_serve  # noqa: F401
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
