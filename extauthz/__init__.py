"""The edge: gRPC servicers (ext_authz Check, KeyService, UsageService, BudgetService) and
their wiring.

No Redis commands here; the domain in `keys` owns the data model.
"""
