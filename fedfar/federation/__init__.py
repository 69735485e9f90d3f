"""The federation, on Flower: thin ClientApp / ServerApp entry points, one node's job per message (`client`), the
FedFar strategy, what travels and its codecs (`exchange`, `codecs`), the run config, the run folder and ledger
(`results`), and launching simulations (`launch`, `processes`)."""
