"""The fixed text whose prompt queries calibrate FP8 keys' scale search once, at an engine's start
(``ZIPAGE_FP8_QUERY_WEIGHTS=calibrated``, the default; ``zipage/query_moments.py``).

Counted once and frozen, the moments no longer follow the engine's traffic, so a request's FP8 keys are rounded
the same way whatever ran before or beside it. The text is plain English with some worked arithmetic, the kind of
prompt and reasoning the engine serves; a model without a tokenizer gets a fixed pseudo-random token sequence
instead.
"""

from __future__ import annotations

import os
import warnings

import torch

CALIBRATION_TEXT = """\
A small bakery sells loaves for four dollars each and rolls for seventy-five cents. On Saturday it sold 128
loaves and three times as many rolls. How much did it take in? First the loaves: 128 times 4 is 512 dollars.
Next the rolls: three times 128 is 384 rolls, and 384 times 0.75 is 288 dollars. Together that is 512 plus 288,
which is 800 dollars. Let me check the second product another way: 384 is 400 minus 16, and three quarters of
400 is 300 while three quarters of 16 is 12, so 300 minus 12 gives 288 again. The answer is 800 dollars.

The river that runs past the old mill rises every spring when the snow melts in the hills. For most of the year
it is shallow enough to wade across, but in April the water turns brown and fast, and the stepping stones
disappear. People in the village have learned to keep their boats tied high on the bank, and the miller, who
has lived there for forty years, says he can tell how wet the summer will be from the color of the spring flood.

Problem. Find every real number x such that x squared minus 5x plus 6 equals zero. Solution. We look for two
numbers whose product is 6 and whose sum is 5; they are 2 and 3, so the polynomial factors as (x - 2)(x - 3).
A product is zero exactly when one of its factors is zero, hence x = 2 or x = 3. Substituting back: 4 - 10 + 6
= 0 and 9 - 15 + 6 = 0, so both values work and there are no others.

When you write a function that sorts a list, it helps to decide first what should happen to items that compare
equal. A stable sort keeps them in the order they arrived, which matters when the list was already sorted by
another key. Suppose we have records of students with a name and a grade, sorted by name, and we now sort them
by grade: with a stable sort, students with the same grade remain in alphabetical order.

Question: a train leaves at 9:40 and arrives at 13:15. How long is the journey? From 9:40 to 12:40 is three
hours, and from 12:40 to 13:15 is thirty-five minutes, so the trip takes three hours and thirty-five minutes,
or 215 minutes in all. If the distance is 301 kilometers, the average speed is 301 divided by 215/60 hours,
that is 301 times 60 over 215, which is 18060 over 215, or 84 kilometers per hour.

Every triangle has angles that add up to 180 degrees. If one angle of an isosceles triangle measures 40
degrees, there are two cases. Either the 40-degree angle is the apex, and the two base angles share the
remaining 140 degrees, 70 each; or 40 is a base angle, so the other base angle is also 40 and the apex is 100.
Both triangles exist, so the question has two answers unless it says which angle is the apex.

She opened the letter slowly, unsure whether she wanted to know what it said. The handwriting was her
grandmother's, careful and slanted, and the paper smelled faintly of lavender. It began with the weather, as
all her letters did, and then, halfway down the first page, it turned to the house by the sea and the reason
it had been closed for so many years.

To estimate the square root of 50, note that 7 squared is 49, so the root is a little more than 7. Writing it
as 7 plus a small number e, we need 49 + 14e + e squared = 50; dropping the tiny e squared gives e close to
1/14, about 0.0714. So the square root of 50 is approximately 7.0714, and indeed 7.0714 squared is 50.0047,
slightly too large, as expected since we ignored a positive term. Therefore the final answer is about 7.071.
"""


def calibration_ids(tokenizer, vocab_size: int, limit: int) -> list[int]:
    """The calibration prompt's token ids, at most ``limit`` of them: :data:`CALIBRATION_TEXT` through
    ``tokenizer`` as a prompt is tokenized (its special tokens added: a BOS where the tokenizer adds one), or
    without one 512 ids drawn from ``range(vocab_size)`` by a fixed seed (so an engine built from a model object
    without its tokenizer calibrates on other ids than one built by name)."""
    if limit < 1:
        raise ValueError(f"calibration_ids: limit={limit}: expected at least one token")
    if tokenizer is not None:
        ids = list(tokenizer(CALIBRATION_TEXT)["input_ids"])
        if ids:
            return ids[:limit]
    if not vocab_size or vocab_size < 1:
        raise ValueError("calibration_ids: no tokenizer and no vocab_size to draw token ids from")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (min(512, limit),), generator=gen).tolist()


def calibrate_engine(runner, tokenizer, config, max_model_len: int, single_process: bool) -> None:
    """At an engine's start, with FP8 keys weighted by a fixed text's queries (``runner.query_moments`` set and
    ``ZIPAGE_FP8_QUERY_WEIGHTS`` calibrated): count :func:`calibration_ids` (at most the model's positions, whatever
    ``max_model_len`` says) and freeze them (``runner.calibrate_query_moments``; every rank counts its heads' in the
    same forward). Left to its default on one process, a failure falls back to the moments of the prompts served,
    with a warning; asked for by name, or on several ranks (which could not agree on falling back), it raises."""
    from .query_moments import LIMIT

    positions = next((int(getattr(config, a)) for a in ("max_position_embeddings", "max_target_positions",
                                                        "n_positions") if getattr(config, a, None)), None)
    limit = min(max_model_len, LIMIT, positions or LIMIT)
    fallback = "ZIPAGE_FP8_QUERY_WEIGHTS" not in os.environ and single_process
    try:
        ids = calibration_ids(tokenizer, getattr(config, "vocab_size", None), limit)
    except Exception as e:
        if not fallback:
            raise
        warnings.warn(f"FP8 keys' query weights: no calibration text ({type(e).__name__}: {e}); the weights follow "
                      "the prompts this engine serves instead", RuntimeWarning, stacklevel=3)
        return
    runner.calibrate_query_moments(ids, fallback=fallback)
