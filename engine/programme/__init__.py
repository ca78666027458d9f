"""The loyalty programme's books: the points ledger, tier qualification and review, member intelligence
(lifecycle, RFM, value), `update` steps on the member, and `report --programme`.

May import: engine.domain, engine.rules, engine.store.
"""
