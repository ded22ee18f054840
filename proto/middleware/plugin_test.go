package middleware

import (
	"context"
	"testing"

	"github.com/hashicorp/go-plugin"

	"github.com/shoalhq/shoal/proto/middleware/middlewarepb"
)

type echoImpl struct{}

func (echoImpl) Decide(_ context.Context, req *middlewarepb.DecideRequest) (*middlewarepb.DecideReply, error) {
	if req.GetChannel() == "no" {
		return &middlewarepb.DecideReply{Verdict: middlewarepb.Verdict_DENY,
			Error: &middlewarepb.Error{Name: "NoError", Message: req.GetUser() + " may not"}}, nil
	}
	return &middlewarepb.DecideReply{Verdict: middlewarepb.Verdict_PASS, Data: req.GetData(), HasData: true}, nil
}

// TestGRPCRoundTrip runs the service over go-plugin's in-process gRPC
// connection: the request fields arrive and the reply comes back.
func TestGRPCRoundTrip(t *testing.T) {
	client, server := plugin.TestPluginGRPCConn(t, false, map[string]plugin.Plugin{PluginName: &GRPCPlugin{Impl: echoImpl{}}})
	// Stop the server from this goroutine only: client.Close() would also
	// stop it (through go-plugin's controller Shutdown) on a server
	// goroutine, and go-plugin's GRPCServer.Stop is not safe to run twice
	// at once (a data race inside go-plugin under -race).
	defer server.Stop()
	defer client.Conn.Close()
	raw, err := client.Dispense(PluginName)
	if err != nil {
		t.Fatal(err)
	}
	mw := raw.(Middleware)
	ctx := context.Background()
	r, err := mw.Decide(ctx, &middlewarepb.DecideRequest{Action: "publishIn", Channel: "no", User: "alice"})
	if err != nil || r.GetVerdict() != middlewarepb.Verdict_DENY || r.GetError().GetMessage() != "alice may not" {
		t.Fatalf("deny: %v %v", r, err)
	}
	r, err = mw.Decide(ctx, &middlewarepb.DecideRequest{Action: "publishIn", Channel: "ok", Data: []byte(`{"a":1}`)})
	if err != nil || r.GetVerdict() != middlewarepb.Verdict_PASS || string(r.GetData()) != `{"a":1}` || !r.GetHasData() {
		t.Fatalf("pass: %v %v", r, err)
	}
}

func TestGRPCServerNeedsImpl(t *testing.T) {
	if err := (&GRPCPlugin{}).GRPCServer(nil, nil); err == nil {
		t.Fatal("no error without an implementation")
	}
}
