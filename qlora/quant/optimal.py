"""BOF4: 4-bit codebooks that minimise the expected squared error of absmax-normalised Gaussian
blocks (Lloyd–Max; the idea of BOF4, Blumenberg et al., arXiv 2505.06653).

NF4 places its levels at normal quantiles, which ignores how a block is normalised: dividing by the
block's absmax squeezes the other B - 1 values into (-1, 1) with a density that depends on B. For
X_1..X_B iid N(0, 1), M = max |X_i| has density p_M(m) = 2B φ(m) (2Φ(m) - 1)^(B-1); given M = m the
other values are N(0, 1) truncated to (-m, m). So a block value divided by M is ±1 with probability
1/B (the maximum itself) and otherwise has the density on (-1, 1)

    f_B(y) ∝ ∫_0^∞ φ(m) (2Φ(m) - 1)^(B-2) · m φ(y m) dm.

"bof4" (absmax, as NF4): levels ±1 are fixed (the maximum is reconstructed exactly) and the other 14
minimise ∫ (y - Q(y))² f_B(y) dy. "bof4s" (signed absmax): each block is divided by its
largest-magnitude value *with its sign*, so the maximum always lands on +1; the rest still follows
f_B (symmetric), and +1 is fixed while the other 15 levels are free, one more level than bof4 where
the values are. Neither has an exact zero (MSE does not ask for one).

The derivation is deterministic (a fixed quadrature in float64, Lloyd iterations to a fixed point,
then rounded to float32); `BOF4_TABLES` stores its result once per block size and
tests/quant/test_optimal.py re-derives them.
"""

from __future__ import annotations

import functools
import math

import torch

OPTIMAL_TYPES = ("bof4", "bof4s")

_M_MAX, _M_POINTS = 8.0, 4001  # quadrature over the block maximum m (P(M > 8) < 1e-11 for B <= 4096)
_Y_POINTS = 8193  # density grid on [0, 1] (f_B is even)
_TOL, _MAX_ITERS = 1e-14, 100_000

# `derive_bof4(blocksize, signed)` for every supported block size, float32 (re-derived by the tests).
BOF4_TABLES = {
    "bof4": {
        32: (
            -1.0, -0.7950746417045593, -0.6329148411750793, -0.49527108669281006,
            -0.37291374802589417, -0.26036974787712097, -0.15396906435489655, -0.05096092075109482,
            0.05096092075109482, 0.15396906435489655, 0.26036974787712097, 0.37291374802589417,
            0.49527108669281006, 0.6329148411750793, 0.7950746417045593, 1.0,
        ),
        64: (
            -1.0, -0.7765624523162842, -0.6112415194511414, -0.47533050179481506,
            -0.35657575726509094, -0.2484072595834732, -0.1467072069644928, -0.048528965562582016,
            0.048528965562582016, 0.1467072069644928, 0.2484072595834732, 0.35657575726509094,
            0.47533050179481506, 0.6112415194511414, 0.7765624523162842, 1.0,
        ),
        128: (
            -1.0, -0.7569266557693481, -0.5895862579345703, -0.4560292661190033,
            -0.34105005860328674, -0.23716330528259277, -0.13992388546466827, -0.046263694763183594,
            0.046263694763183594, 0.13992388546466827, 0.23716330528259277, 0.34105005860328674,
            0.4560292661190033, 0.5895862579345703, 0.7569266557693481, 1.0,
        ),
        256: (
            -1.0, -0.7365646958351135, -0.5683603882789612, -0.43762922286987305,
            -0.32647669315338135, -0.22670358419418335, -0.1336454153060913, -0.044171806424856186,
            0.044171806424856186, 0.1336454153060913, 0.22670358419418335, 0.32647669315338135,
            0.43762922286987305, 0.5683603882789612, 0.7365646958351135, 1.0,
        ),
        512: (
            -1.0, -0.7158477902412415, -0.5478528738021851, -0.4202711880207062,
            -0.3129045069217682, -0.21703386306762695, -0.12786492705345154, -0.042249370366334915,
            0.042249370366334915, 0.12786492705345154, 0.21703386306762695, 0.3129045069217682,
            0.4202711880207062, 0.5478528738021851, 0.7158477902412415, 1.0,
        ),
        1024: (
            -1.0, -0.6951084733009338, -0.5282530188560486, -0.40401360392570496,
            -0.30032724142074585, -0.2081265151500702, -0.12255773693323135, -0.04048696532845497,
            0.04048696532845497, 0.12255773693323135, 0.2081265151500702, 0.30032724142074585,
            0.40401360392570496, 0.5282530188560486, 0.6951084733009338, 1.0,
        ),
        2048: (
            -1.0, -0.6746286749839783, -0.5096712708473206, -0.38885942101478577,
            -0.2887054979801178, -0.1999358981847763, -0.1176905483007431, -0.0388726145029068,
            0.0388726145029068, 0.1176905483007431, 0.1999358981847763, 0.2887054979801178,
            0.38885942101478577, 0.5096712708473206, 0.6746286749839783, 1.0,
        ),
        4096: (
            -1.0, -0.6546344757080078, -0.49215829372406006, -0.3747764825820923,
            -0.27798202633857727, -0.19240806996822357, -0.11322697252035141, -0.037393536418676376,
            0.037393536418676376, 0.11322697252035141, 0.19240806996822357, 0.27798202633857727,
            0.3747764825820923, 0.49215829372406006, 0.6546344757080078, 1.0,
        ),
    },
    "bof4s": {
        32: (
            -0.8858285546302795, -0.7120994925498962, -0.5682237148284912, -0.44263577461242676,
            -0.3288574516773224, -0.2227628529071808, -0.1214250698685646, -0.022543247789144516,
            0.07589264959096909, 0.17584218084812164, 0.27943915128707886, 0.38927116990089417,
            0.5088180899620056, 0.6432730555534363, 0.80134117603302, 1.0,
        ),
        64: (
            -0.8692921996116638, -0.6885387897491455, -0.5450233817100525, -0.4224735200405121,
            -0.3128127157688141, -0.21128380298614502, -0.11469057947397232, -0.020610995590686798,
            0.07302840054035187, 0.16824308037757874, 0.26726025342941284, 0.3728668987751007,
            0.4889950454235077, 0.62192702293396, 0.7833099961280823, 1.0,
        ),
        128: (
            -0.849723219871521, -0.6637158989906311, -0.5217405557632446, -0.40274983644485474,
            -0.2973264157772064, -0.20025622844696045, -0.10817737877368927, -0.018610479310154915,
            0.07053637504577637, 0.16129380464553833, 0.25593289732933044, 0.3573661744594574,
            0.4698607325553894, 0.6006180047988892, 0.7641851902008057, 1.0,
        ),
        256: (
            -0.827090322971344, -0.6380911469459534, -0.4987378716468811, -0.3836820721626282,
            -0.2825130224227905, -0.1897343099117279, -0.10190790146589279, -0.01654728502035141,
            0.06842473894357681, 0.1550246775150299, 0.24553030729293823, 0.34292057156562805,
            0.4516903758049011, 0.5797657370567322, 0.7443594932556152, 1.0,
        ),
        512: (
            -0.8016369938850403, -0.6121352910995483, -0.4763067662715912, -0.3654188811779022,
            -0.2684406638145447, -0.17974892258644104, -0.09590157121419907, -0.014442305080592632,
            0.06666821241378784, 0.14941206574440002, 0.23604752123355865, 0.3295742869377136,
            0.43462514877319336, 0.5596598982810974, 0.7241959571838379, 1.0,
        ),
        1024: (
            -0.7739790678024292, -0.5863561034202576, -0.4547160863876343, -0.34809160232543945,
            -0.2551741302013397, -0.1703396439552307, -0.09019552171230316, -0.012341445311903954,
            0.06520875543355942, 0.14438983798027039, 0.22742271423339844, 0.3172946572303772,
            0.4187047481536865, 0.5404765605926514, 0.7040102481842041, 1.0,
        ),
        2048: (
            -0.7450805902481079, -0.5612869262695312, -0.4342293441295624, -0.3318345546722412,
            -0.24279123544692993, -0.1615651547908783, -0.08484905958175659, -0.010314627550542355,
            0.06396263092756271, 0.13986249268054962, 0.21955706179141998, 0.3059982359409332,
            0.4038974344730377, 0.5222991108894348, 0.6840589046478271, 1.0,
        ),
        4096: (
            -0.7160630226135254, -0.5374223589897156, -0.41507983207702637, -0.3167700469493866,
            -0.2313688099384308, -0.15348903834819794, -0.07992880046367645, -0.00843977089971304,
            0.06283704936504364, 0.13572318851947784, 0.2123357504606247, 0.2955760061740875,
            0.3901282250881195, 0.5051442980766296, 0.6645374894142151, 1.0,
        ),
    },
}


@functools.cache  # bof4 and bof4s share it; callers only read the tensors
def normalised_density(blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, f) on [0, 1], f ∝ f_B(y) (unnormalised), float64."""
    m = torch.linspace(0, _M_MAX, _M_POINTS, dtype=torch.float64)[1:]
    y = torch.linspace(0, 1, _Y_POINTS, dtype=torch.float64)
    log_phi_m = -0.5 * m * m
    log_mass = (blocksize - 2) * torch.log(torch.special.erf(m / math.sqrt(2)))  # (2Φ(m) - 1)^(B-2)
    log_w = log_phi_m + log_mass + torch.log(m)  # (m,)
    log_w = log_w - log_w.max()  # the constant cancels in every centroid
    integrand = torch.exp(log_w[None, :] - 0.5 * (y[:, None] * m[None, :]) ** 2)  # (y, m)
    return y, torch.trapezoid(integrand, m, dim=1)


def _cumulative(y: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid on [-1, 1] with the cumulative integrals of f and y·f (trapezoid)."""
    y2 = torch.cat([-y.flip(0)[:-1], y])
    f2 = torch.cat([f.flip(0)[:-1], f])
    dy = y2[1:] - y2[:-1]
    c0 = torch.cat([torch.zeros(1, dtype=y.dtype), torch.cumsum(0.5 * (f2[1:] + f2[:-1]) * dy, 0)])
    yf = y2 * f2
    c1 = torch.cat([torch.zeros(1, dtype=y.dtype), torch.cumsum(0.5 * (yf[1:] + yf[:-1]) * dy, 0)])
    return y2, c0, c1


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    t = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + t * (fp[i] - fp[i - 1])


def lloyd_max(blocksize: int, signed: bool) -> torch.Tensor:
    """The 16 sorted levels (float64) minimising E[(y - Q(y))²] under f_B, fixed ends as described
    in the module docstring. Lloyd: boundaries at midpoints, free levels at their cell centroids."""
    y, c0, c1 = _cumulative(*normalised_density(blocksize))
    levels = torch.linspace(-1, 1, 16, dtype=torch.float64)
    free = torch.ones(16, dtype=torch.bool)
    free[-1] = False
    if not signed:
        free[0] = False
    for _ in range(_MAX_ITERS):
        edges = torch.cat([levels.new_tensor([-1.0]), (levels[:-1] + levels[1:]) / 2, levels.new_tensor([1.0])])
        mass, moment = _interp(edges, y, c0), _interp(edges, y, c1)
        centroid = (moment[1:] - moment[:-1]) / (mass[1:] - mass[:-1])
        new = torch.where(free, centroid, levels)
        if float((new - levels).abs().max()) < _TOL:
            return new
        levels = new
    raise RuntimeError(f"Lloyd-Max did not converge for blocksize {blocksize}")


def derive_bof4(blocksize: int, signed: bool = False) -> tuple[float, ...]:
    """The float32 table of bof4 (signed=False) or bof4s at `blocksize`, as stored below."""
    return tuple(torch.tensor(lloyd_max(blocksize, signed).tolist(), dtype=torch.float32).tolist())
