"""Entry point for the tiny end-to-end demo (see metamorph_jax/demo.py)."""
import sys

from metamorph_jax.demo import main

if __name__ == "__main__":
    sys.exit(main())
