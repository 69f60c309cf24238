"""The agent's HTTP routes, one router per concern; ``vmferry.agent.app`` assembles them."""
