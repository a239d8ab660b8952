from modelfleet.worker.scheduler import plan_admission


def test_admits_in_order_while_rows_and_budget_allow():
    assert plan_admission([(10, 1), (10, 1), (10, 1)], free_rows=2, token_budget=100) == 2
    assert plan_admission([(60, 1), (60, 1)], free_rows=8, token_budget=100) == 1


def test_a_long_prompt_alone_is_still_admitted():
    assert plan_admission([(5000, 1)], free_rows=8, token_budget=100) == 1


def test_no_overtaking_when_the_head_does_not_fit():
    assert plan_admission([(10, 4), (10, 1)], free_rows=2, token_budget=100) == 0


def test_n_choices_take_n_rows():
    assert plan_admission([(10, 3), (10, 3)], free_rows=5, token_budget=100) == 1


def test_kv_budget_admits_while_every_row_fits_at_its_planned_length():
    from modelfleet.worker.scheduler import KvRoom

    # 2 running rows that can reach 99 tokens: 100 columns each, 200 of 500 slots
    room = KvRoom(budget=500, rows=2, longest=99)
    assert plan_admission([(10, 1)] * 5, free_rows=8, token_budget=100, kv=room, longest=[50] * 5) == 3
    # one newcomer that can reach 199 tokens makes every row 200 columns wide
    assert plan_admission([(10, 1), (10, 1)], free_rows=8, token_budget=100, kv=room, longest=[199, 10]) == 0
    assert KvRoom(budget=500).never_fits(3, 199) and not KvRoom(budget=500).never_fits(2, 199)


def test_admission_plans_for_the_next_tokens_not_the_longest():
    from modelfleet.worker.scheduler import KV_LOOKAHEAD, planned_length

    assert planned_length(current=10, longest=2048) == 10 + KV_LOOKAHEAD  # a long max_tokens holds nothing yet
    assert planned_length(current=10, longest=20) == 20  # never past what the sequence can reach
