"""`hhbench distill`: train converted hybrids back towards their teacher (issue 11). One stage per module:
data (the token stream), recipe (every choice, frozen), stages (the two losses), checkpoint (what a student is),
train (the loop, data-parallel and variant-parallel)."""
