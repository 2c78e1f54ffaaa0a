"""The hub's web dashboard (a stub until issue 15 lands): the three hooks hub/server.py calls."""


def init_db(conn):
    """Called once at start, after the hub's schema exists (conn: sqlite3.Connection)."""


def on_post(conn, post):
    """Called inside the transaction that inserts each post (post: dict id, channel, agent_id, content, created_at)."""


def routes(state):
    """Starlette routes mounted on the hub app (state: db_path, repo_path, read_token, loopback)."""
    return []
