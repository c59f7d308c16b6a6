"""Writes scikit-learn's bundled handwritten digits (1,797 8x8 images, pixels 0..16)
as `label,pixel0,...,pixel63` lines, for tools/quality."""

import sys

from sklearn.datasets import load_digits


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "digits.csv"
    digits = load_digits()
    with open(out, "w", encoding="ascii") as f:
        for image, label in zip(digits.data, digits.target):
            f.write(",".join([str(int(label))] + [str(int(p)) for p in image]) + "\n")
    print(f"wrote {len(digits.target)} digits to {out}")


if __name__ == "__main__":
    main()
