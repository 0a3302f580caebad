// Go pgx (v4, Debian's golang-github-jackc-pgx-v4-dev) through tidepool with
// its defaults: the connection's statement cache prepares every query as a
// named statement (statement_cache_mode=prepare, capacity 512) and reuses it
// in later transactions. pgxpool gives WORKERS goroutines their connections.
//
// Usage: pgx_check URL WORKERS ITERATIONS
//
// Each goroutine runs ITERATIONS rounds of a query by id (checked), an update
// and an insert in a transaction (pgx.BeginFunc); goroutine 0 adds a column
// half way (a schema change mid-run). Finally sums and counts are checked.
// Prints "go pgx: OK ..." and exits 0, or a diagnostic and 1.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run() error {
	url := os.Args[1]
	workers, _ := strconv.Atoi(os.Args[2])
	iterations, _ := strconv.Atoi(os.Args[3])
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return err
	}
	cfg.MaxConns = int32(workers)
	pool, err := pgxpool.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			if err := work(ctx, pool, w, iterations); err != nil {
				errs <- fmt.Errorf("worker %d: %w", w, err)
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	var sum, events int
	if err := pool.QueryRow(ctx, "SELECT sum(qty)::int, (SELECT count(*) FROM events)::int FROM items").Scan(&sum, &events); err != nil {
		return err
	}
	want := workers * iterations
	if sum != want || events != want {
		return fmt.Errorf("sum(qty) %d, events %d, want %d each", sum, events, want)
	}
	fmt.Printf("go pgx: OK %d workers x %d iterations\n", workers, iterations)
	return nil
}

func work(ctx context.Context, pool *pgxpool.Pool, w, iterations int) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	for i := 0; i < iterations; i++ {
		id := (w*7+i)%100 + 1
		var gotID, qty int
		var name string
		if err := conn.QueryRow(ctx, "SELECT id, name, qty FROM items WHERE id = $1", id).Scan(&gotID, &name, &qty); err != nil {
			return fmt.Errorf("select %d: %w", id, err)
		}
		if gotID != id || name != fmt.Sprintf("item%d", id) {
			return fmt.Errorf("select %d got %d %q", id, gotID, name)
		}
		err := conn.BeginFunc(ctx, func(tx pgx.Tx) error {
			tag, err := tx.Exec(ctx, "UPDATE items SET qty = qty + 1 WHERE id = $1", id)
			if err != nil {
				return err
			}
			if tag.RowsAffected() != 1 {
				return fmt.Errorf("update %d touched %d", id, tag.RowsAffected())
			}
			_, err = tx.Exec(ctx, "INSERT INTO events (worker, n) VALUES ($1, $2)", w, i)
			return err
		})
		if err != nil {
			return err
		}
		if w == 0 && i == iterations/2 {
			if _, err := conn.Exec(ctx, "ALTER TABLE items ADD COLUMN note text"); err != nil {
				return err
			}
		}
	}
	return nil
}
