"""Decoding: one step (:mod:`.step`, the mask rule and the forward) and one greedy loop
(:mod:`.loop`) that every decoder of mgaudit consumes."""
