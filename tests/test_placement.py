from layerpipe.schedule.placement import contiguous, looping, vshape


def test_contiguous_puts_stage_s_on_rank_s():
    placement = contiguous(4)
    assert placement.stage_ranks == (0, 1, 2, 3)
    assert placement.stages_per_rank == 1


def test_looping_puts_stage_s_on_rank_s_mod_p():
    placement = looping(3, 2)
    assert placement.stage_ranks == (0, 1, 2, 0, 1, 2)
    assert placement.stages_of(1) == (1, 4)


def test_vshape_puts_stages_r_and_2p_minus_1_minus_r_on_rank_r():
    placement = vshape(4)
    assert [placement.stages_of(rank) for rank in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
