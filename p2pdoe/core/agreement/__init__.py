"""The decentralized agreement (consensus ADMM): communities and the DSO as sans-I/O participants.

Every coupling is an equality between two parties' values (a buyer's purchase and the seller's sale;
a community's envelope request and the DSO's grant). Each party keeps the same agreed value y and
price, updates them from the two proposals with the same arithmetic, and never needs a central node.
"""
