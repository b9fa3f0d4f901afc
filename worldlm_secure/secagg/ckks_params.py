"""CKKS parameters for secure summation, and the precision budget that follows from them (pure math, no keys).

Why these defaults (N = 4096, moduli [60, 49], scale 2^17):
- Summation needs additions only (weights are applied by members, the division by Σw happens after
  decryption), so the ciphertext needs ONE data prime and no multiplicative level. The last prime
  (49 bits) is SEAL's special prime: it never travels in a ciphertext, but public-key encryption runs
  at the key level and divides the fresh noise by it, leaving only rounding noise (std about N/6 in
  the slot domain per member, measured).
- 60 + 49 = 109 bits is the largest total SEAL/HE-standard allows at N = 4096 for 128-bit security.
- A slot carries integers, not reals: members quantize to `value_bits` and pack several integers per
  slot (see ckks_packing). The usable integer width of a slot is
  ``slot_bits = min(data_bits - scale_bits - 2, 43)``: the scaled value must stay below q/2, and the
  decoder works in float64 (53-bit mantissa; measured decode error about |slot| * 2^-50, so 2^42 keeps
  it below 2^-7). The noise must stay far below 0.5 in the integer domain: we require
  ``0.5 * 2^scale_bits >= 12 * sqrt(n) * N / 6`` (a 12-sigma margin: failure probability < 1e-32 per slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from worldlm_secure.errors import ConfigError

# Largest total coefficient-modulus bits for 128-bit classical security (SEAL CoeffModulus::MaxBitCount,
# HomomorphicEncryption.org standard, ternary secret).
MAX_MODULUS_BITS_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# float64 decode limit: |slot| < 2^(DOUBLE_SLOT_BITS - 1) keeps the decoder's rounding error below 2^-7.
DOUBLE_SLOT_BITS = 43
# Noise margin in standard deviations (0.5 / sigma >= NOISE_SIGMAS).
NOISE_SIGMAS = 12.0


@dataclass(frozen=True)
class CkksParams:
    """CKKS settings of one federation (the policy's `secure_aggregation.ckks` section plus packing).

    poly_modulus_degree: ring degree N (slots = N/2). coeff_mod_bit_sizes: prime sizes in bits, the last
    one is the special (key-switching) prime. scale_bits: log2 of the CKKS scale. key_holders: member
    names that receive the secret key (empty: the first member in sorted order). rotate_every_rounds:
    a new key every that many rounds (0: never). clip_range: values are clipped to
    [-clip_range, clip_range] before quantization (same units as the vector). value_bits: quantization
    precision; the absolute error per value is at most clip_range / (2^(value_bits+1) - 2).
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 17
    key_holders: tuple[str, ...] = ()
    rotate_every_rounds: int = 0
    clip_range: float = 1.0
    value_bits: int = 20

    @classmethod
    def from_policy(cls, section: object | None, clip_range: float | None = None) -> "CkksParams":
        """Build from the policy's ckks section (any object with the attributes), a CkksParams, or None."""
        if section is None:
            base = cls()
        elif isinstance(section, CkksParams):
            base = section
        else:
            defaults = cls()
            holders = getattr(section, "key_holders", None) or ()
            base = cls(
                poly_modulus_degree=int(getattr(section, "poly_modulus_degree", None) or defaults.poly_modulus_degree),
                coeff_mod_bit_sizes=tuple(
                    int(b) for b in (getattr(section, "coeff_mod_bit_sizes", None) or defaults.coeff_mod_bit_sizes)
                ),
                scale_bits=int(getattr(section, "scale_bits", None) or defaults.scale_bits),
                key_holders=tuple(str(h) for h in holders),
                rotate_every_rounds=int(getattr(section, "rotate_every_rounds", None) or 0),
                clip_range=float(getattr(section, "clip_range", None) or defaults.clip_range),
                value_bits=int(getattr(section, "value_bits", None) or defaults.value_bits),
            )
        if clip_range is not None:
            base = CkksParams(
                base.poly_modulus_degree, base.coeff_mod_bit_sizes, base.scale_bits, base.key_holders,
                base.rotate_every_rounds, float(clip_range), base.value_bits,
            )
        base.validate()
        return base

    # ---- derived quantities -------------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        """Real slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a ciphertext carries (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slot_bits(self) -> int:
        """Width in bits of the exact integer each slot carries (sum over all members included)."""
        return min(self.data_bits - self.scale_bits - 2, DOUBLE_SLOT_BITS)

    def noise_std(self, members: int) -> float:
        """Expected standard deviation of the CKKS error of a sum of `members` fresh ciphertexts, in integer units."""
        return math.sqrt(max(members, 1)) * (self.poly_modulus_degree / 6.0) / 2.0**self.scale_bits

    def max_members(self) -> int:
        """Largest cohort whose summed CKKS noise keeps the 12-sigma margin below 0.5."""
        per_member = (self.poly_modulus_degree / 6.0) / 2.0**self.scale_bits
        return int((0.5 / (NOISE_SIGMAS * per_member)) ** 2)

    @property
    def precision(self) -> float:
        """Maximum absolute quantization error per value, in units of the vector (nearest rounding)."""
        return self.clip_range / (2.0 ** (self.value_bits + 1) - 2.0)

    # ---- checks -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the field and the fix) unless the parameters are usable."""
        pre = "secure_aggregation.ckks"
        n = self.poly_modulus_degree
        if n not in MAX_MODULUS_BITS_128:
            raise ConfigError(f"{pre}.poly_modulus_degree: must be one of {sorted(MAX_MODULUS_BITS_128)} (got {n})")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            raise ConfigError(
                f"{pre}.coeff_mod_bit_sizes: need a data prime and a special prime, e.g. [60, 49] (got {list(bits)})"
            )
        if any(b < 20 or b > 60 for b in bits):
            raise ConfigError(f"{pre}.coeff_mod_bit_sizes: every prime must be 20..60 bits (got {list(bits)})")
        if sum(bits) > MAX_MODULUS_BITS_128[n]:
            raise ConfigError(
                f"{pre}.coeff_mod_bit_sizes: total {sum(bits)} bits exceeds the 128-bit-security limit "
                f"{MAX_MODULUS_BITS_128[n]} for poly_modulus_degree {n}; use fewer/smaller primes or a larger degree"
            )
        if not 1 <= self.scale_bits <= 60:
            raise ConfigError(f"{pre}.scale_bits: must be 1..60 (got {self.scale_bits})")
        if self.max_members() < 1:
            need = math.ceil(math.log2(2 * NOISE_SIGMAS * n / 6.0))
            raise ConfigError(
                f"{pre}.scale_bits: {self.scale_bits} leaves CKKS noise above the integer precision; use >= {need}"
            )
        if self.slot_bits < 8:
            raise ConfigError(
                f"{pre}.scale_bits: {self.scale_bits} leaves only {self.slot_bits} integer bits per slot "
                f"(data primes {list(bits[:-1])}); lower scale_bits or add a data prime"
            )
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ConfigError(f"{pre}.clip_range: must be a positive finite number (got {self.clip_range})")
        if not 2 <= self.value_bits <= 40:
            raise ConfigError(f"{pre}.value_bits: must be 2..40 (got {self.value_bits})")
        if self.rotate_every_rounds < 0:
            raise ConfigError(f"{pre}.rotate_every_rounds: must be >= 0 (got {self.rotate_every_rounds})")

    def check_cohort(self, members: int) -> None:
        """Raise ConfigError when `members` ciphertexts summed would exceed the noise budget."""
        if members > self.max_members():
            need = math.ceil(math.log2(2 * NOISE_SIGMAS * math.sqrt(members) * self.poly_modulus_degree / 6.0))
            raise ConfigError(
                f"secure_aggregation.ckks.scale_bits: {self.scale_bits} supports at most {self.max_members()} "
                f"members per sum (got {members}); use scale_bits >= {need}"
            )
