"""Django's QuerySet.iterator() through tidepool, as a Django app runs it.

In autocommit, iterator() reads through a server-side cursor declared WITH
HOLD (DECLARE "_django_curs_..." NO SCROLL CURSOR WITH HOLD FOR ...), FETCHes
it in chunks and CLOSEs it: tidepool pins the client to its server while the
cursor exists, and must let it go once it is closed. 8 threads on a pool of
5, connections kept as with CONN_MAX_AGE: each reads the table with
iterator(), then (once all 8 have) runs 20 transactions. While all 8 still
hold their connections, the console's SHOW CLIENTS must show none of them
pinned. Without pins that end, 5 pinned clients would hold the whole pool and
the other 3 could not even read.

Usage: django_iterator.py URL ADMIN_URL; prints "django iterator: OK".
"""

import sys
import threading
from urllib.parse import unquote, urlparse

import django
import psycopg
from django.conf import settings

url, admin_url = sys.argv[1], sys.argv[2]
u = urlparse(url)
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": u.path.lstrip("/"),
            "USER": unquote(u.username),
            "PASSWORD": unquote(u.password or ""),
            "HOST": u.hostname,
            "PORT": u.port,
            "CONN_MAX_AGE": 600,
        }
    },
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()

from django.db import connection, models, transaction  # noqa: E402
from django.db.models import F, Sum  # noqa: E402

THREADS, ROWS, TXNS = 8, 500, 20


class Item(models.Model):
    n = models.IntegerField()

    class Meta:
        app_label = "tp"
        db_table = "tp_item"
        managed = False


with connection.cursor() as c:
    c.execute("create table tp_item (id serial primary key, n int not null)")
    c.execute("insert into tp_item (n) select 0 from generate_series(1, %s)", [ROWS])
connection.close()

errors = []
all_read = threading.Barrier(THREADS + 1)
all_done = threading.Barrier(THREADS + 1)
leave = threading.Event()


def worker(k):
    try:
        seen = sum(1 for _ in Item.objects.all().iterator(chunk_size=100))
        assert seen == ROWS, f"read {seen} rows"
        all_read.wait(timeout=60)
        for i in range(TXNS):
            with transaction.atomic():
                Item.objects.filter(id=1 + (k * TXNS + i) % ROWS).update(n=F("n") + 1)
        all_done.wait(timeout=60)
        # The connection stays open (CONN_MAX_AGE) while the console looks.
        leave.wait(timeout=60)
    except Exception as e:  # noqa: BLE001
        errors.append(f"thread {k}: {e!r}")
        for b in (all_read, all_done):
            b.abort()
    finally:
        connection.close()


threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
for t in threads:
    t.start()
try:
    all_read.wait(timeout=60)
    all_done.wait(timeout=60)
except threading.BrokenBarrierError:
    pass
pinned = None
if not errors:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        cur = admin.execute("SHOW CLIENTS")
        cols = [d.name for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    app = [r for r in rows if r["user"] == unquote(u.username)]
    pinned = [r["pinned"] for r in app if r["pinned"]]
    if len(app) != THREADS:
        errors.append(f"{len(app)} clients listed, {THREADS} expected")
leave.set()
for t in threads:
    t.join(timeout=60)
total = Item.objects.aggregate(s=Sum("n"))["s"]
if total != THREADS * TXNS:
    errors.append(f"sum {total}, {THREADS * TXNS} expected")
if pinned:
    errors.append(f"pinned after their cursors closed: {pinned}")
if errors:
    print("django iterator: FAILED", *errors, sep="\n")
    sys.exit(1)
print("django iterator: OK")
