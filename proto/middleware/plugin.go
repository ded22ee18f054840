// Package middleware is the go-plugin wire for custom middleware: a plugin
// binary serves the gRPC Middleware service (middlewarepb) and the worker's
// `plugin:` rule calls it per action. A plugin's main is one line:
//
//	func main() { middleware.Serve(myImpl{}) }
//
// where myImpl implements Middleware.
package middleware

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/shoalhq/shoal/proto/middleware/middlewarepb"
)

// Middleware is what a plugin implements.
type Middleware interface {
	Decide(ctx context.Context, req *middlewarepb.DecideRequest) (*middlewarepb.DecideReply, error)
}

// Handshake keeps a plugin from being started by anything but a worker (and
// a worker from starting some other go-plugin binary as middleware). It is
// not the control plane's cookie: a shoal child is not a middleware plugin.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "SHOAL_MIDDLEWARE_PLUGIN",
	MagicCookieValue: "7c2e9b14-shoal-middleware",
}

// PluginName is the one plugin a middleware binary serves.
const PluginName = "middleware"

// PluginMap is the plugin set for both sides (the host passes nil).
func PluginMap(impl Middleware) plugin.PluginSet {
	return plugin.PluginSet{PluginName: &GRPCPlugin{Impl: impl}}
}

// Serve runs impl as a middleware plugin until the worker ends it. Log
// through hclog to stderr: the worker forwards the plugin's stderr to its
// own log.
func Serve(impl Middleware) {
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		Plugins:         PluginMap(impl),
		GRPCServer:      plugin.DefaultGRPCServer,
		Logger:          hclog.New(&hclog.LoggerOptions{Name: "plugin", JSONFormat: true}),
	})
}

// GRPCPlugin adapts Middleware to go-plugin's gRPC transport.
type GRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Impl Middleware
}

var _ plugin.GRPCPlugin = (*GRPCPlugin)(nil)

// GRPCServer registers the plugin's implementation.
func (p *GRPCPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	if p.Impl == nil {
		return errors.New("middleware plugin: no implementation")
	}
	middlewarepb.RegisterMiddlewareServer(s, &server{impl: p.Impl})
	return nil
}

// GRPCClient returns a Middleware that calls the plugin.
func (p *GRPCPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &client{c: middlewarepb.NewMiddlewareClient(c)}, nil
}

type server struct {
	middlewarepb.UnimplementedMiddlewareServer
	impl Middleware
}

func (s *server) Decide(ctx context.Context, req *middlewarepb.DecideRequest) (*middlewarepb.DecideReply, error) {
	return s.impl.Decide(ctx, req)
}

type client struct{ c middlewarepb.MiddlewareClient }

func (c *client) Decide(ctx context.Context, req *middlewarepb.DecideRequest) (*middlewarepb.DecideReply, error) {
	r, err := c.c.Decide(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("middleware plugin Decide: %w", err)
	}
	return r, nil
}
