import pytest

from qlora.evaluate.elo import Match, elo_once, elo_orders, elo_tournament, random_orders, win_table

MATCHES = [Match("A", "B", 1.0), Match("A", "C", 0.5), Match("B", "C", 1.0)]


def test_elo_once_against_a_hand_calculation():
    # 1) A beats B, equal ratings: E = 0.5 -> A 1016, B 984
    # 2) A ties C: E_A = 1/(1+10^((1000-1016)/400)) = 1/(1+10^-0.04) = 1/1.9120108 = 0.5230096
    #    A = 1016 + 32 (0.5 - 0.5230096) = 1015.26369, C = 1000 + 32 (0.5 - 0.4769904) = 1000.73631
    # 3) B beats C: E_B = 1/(1+10^((1000.73631-984)/400)) = 1/(1+10^0.0418408) = 1/2.1011355 = 0.4759331
    #    B = 984 + 32 (1 - 0.4759331) = 1000.77014, C = 1000.73631 - 16.77014 = 983.96617
    r = elo_once(MATCHES)
    assert r["A"] == pytest.approx(1015.26369, abs=1e-4)
    assert r["B"] == pytest.approx(1000.77014, abs=1e-4)
    assert r["C"] == pytest.approx(983.96617, abs=1e-4)
    assert sum(r.values()) == pytest.approx(3000.0)  # zero-sum with one K


def test_vectorised_orders_equal_the_one_order_definition():
    matches = MATCHES + [Match("C", "A", 1.0), Match("B", "A", 0.5)]
    orders = random_orders(20, len(matches), seed=5)
    models, ratings = elo_orders(matches, orders)
    for row, order in zip(ratings, orders):
        once = elo_once([matches[i] for i in order.tolist()])
        assert [once[m] for m in models] == pytest.approx(row.tolist(), abs=1e-9)


def test_tournament_is_seeded_and_brackets_the_mean():
    a = elo_tournament(MATCHES, rounds=500, seed=1)
    b = elo_tournament(MATCHES, rounds=500, seed=1)
    c = elo_tournament(MATCHES, rounds=500, seed=2)
    assert a.mean == b.mean and a.low == b.low and a.high == b.high
    assert a.mean != c.mean
    assert sum(a.mean.values()) == pytest.approx(3000.0)
    for m in a.models:
        assert a.low[m] <= a.mean[m] <= a.high[m]
    assert a.mean["A"] > a.mean["B"] > a.mean["C"]
    d = a.to_dict()
    assert [r["model"] for r in d["ratings"]] == ["A", "B", "C"] and d["k"] == 32.0 and d["initial"] == 1000.0


def test_win_table_counts_both_sides():
    t = win_table(MATCHES + [Match("B", "A", 0.0)])
    assert t["A"]["B"] == [2, 0, 0] and t["B"]["A"] == [0, 0, 2]
    assert t["A"]["C"] == [0, 1, 0] and t["C"]["B"] == [0, 0, 1]


def test_self_play_is_rejected():
    with pytest.raises(ValueError):
        elo_tournament([Match("A", "A", 1.0)])
