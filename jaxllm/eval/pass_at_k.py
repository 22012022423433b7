"""pass@k: the probability that at least one of k samples passes, estimated from n >= k samples.

Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"), eq. 1: with c of n
samples correct, pass@k = 1 - C(n-c, k) / C(n, k), the chance that k samples drawn without
replacement from the n all fail, subtracted from one. The binomials overflow floats for
n in the hundreds, so the ratio is taken as the product prod_{i=n-c+1}^{n} (1 - k/i), as in
the paper's numpy snippet.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

STANDARD_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with `c` correct among `n` samples."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
  if n - c < k:  # every draw of k samples holds a correct one
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int] = STANDARD_KS) -> dict[str, float]:
  """{"pass@k": mean over problems} for every k in `ks` that no problem has fewer samples
  than; `counts` holds (n, c) per problem."""
  counts = list(counts)
  if not counts:
    return {}
  fewest = min(n for n, _ in counts)
  return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
          for k in ks if k <= fewest}
