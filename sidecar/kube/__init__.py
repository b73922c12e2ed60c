"""The Kubernetes wing: the AgentRevocation and AgentElevation watchers (`watch`: list,
watch, relist on 410, backoff, Events and status reports). The only place that imports
kubernetes_asyncio."""
