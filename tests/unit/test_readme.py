"""Numbers the README states are the ones the code computes."""

from __future__ import annotations

import math
import re
from pathlib import Path

from medsilo.secure.dp import gaussian_epsilon, noise_for_epsilon

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_dp_example_sigma_is_noise_for_epsilon_rounded_up():
    """Rounded to the README's digits, upwards: a σ rounded down would spend more than the ε it promises."""
    number = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
    sentence = rf"σ = {number} for ε = {number} over (\d+) rounds at δ = {number}"
    found = re.findall(sentence, README.read_text())
    assert len(found) == 1, found
    sigma_text, epsilon, rounds, delta = found[0]
    sigma, digits = float(sigma_text), len(sigma_text.partition(".")[2])
    exact = noise_for_epsilon(float(epsilon), int(rounds), float(delta))
    assert sigma == math.ceil(exact * 10**digits) / 10**digits
    assert gaussian_epsilon(sigma, int(rounds), float(delta)) <= float(epsilon)
