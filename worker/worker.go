// Package worker is the worker process role. STUB: replaced by the owner of this package.
package worker

import (
	"context"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/proto/control"
)

// Child is the worker's control-plane implementation.
type Child struct {
	log hclog.Logger
}

var _ control.Child = (*Child)(nil)

// New returns the worker role, ready to be served by control.Serve.
func New(log hclog.Logger) *Child { return &Child{log: log} }

func (c *Child) Start(ctx context.Context, p control.StartParams) (control.StartResult, error) {
	return control.StartResult{Addrs: map[string]string{}}, nil
}

func (c *Child) Health(ctx context.Context) (control.Health, error) {
	return control.Health{State: control.StateReady}, nil
}

func (c *Child) Stats(ctx context.Context) (control.Stats, error) {
	var st control.Stats
	procstat.Fill(&st)
	return st, nil
}

func (c *Child) SetTopology(ctx context.Context, t control.Topology) error { return nil }

func (c *Child) Drain(ctx context.Context, timeout time.Duration) error { return nil }

func (c *Child) Stop(ctx context.Context) error { return nil }
