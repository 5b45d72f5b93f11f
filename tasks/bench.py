"""Benchmark stub (being written)."""


def main(argv):
    print("bench: not implemented yet")
    return 1
