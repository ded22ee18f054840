package control

import (
	"context"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/shoalhq/shoal/proto/control/controlpb"
)

// ChildPlugin adapts a Child to go-plugin (gRPC only).
type ChildPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Impl Child
}

var (
	_ plugin.GRPCPlugin = (*ChildPlugin)(nil)
	_ Child             = (*grpcClient)(nil)
	_ Reloader          = (*grpcClient)(nil)
	_ Handoverer        = (*grpcClient)(nil)
	_ pb.ChildServer    = (*grpcServer)(nil)
)

func (p *ChildPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	pb.RegisterChildServer(s, &grpcServer{impl: p.Impl})
	return nil
}

func (p *ChildPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &grpcClient{c: pb.NewChildClient(c)}, nil
}

type grpcClient struct{ c pb.ChildClient }

func (g *grpcClient) Start(ctx context.Context, p StartParams) (StartResult, error) {
	r, err := g.c.Start(ctx, &pb.StartRequest{
		Role: string(p.Role), Name: p.Name, Index: int32(p.Index),
		ConfigJson: p.Config, RunDir: p.RunDir, Topology: topologyToPB(p.Topology),
	})
	if err != nil {
		return StartResult{}, err
	}
	return StartResult{Addrs: r.GetAddrs()}, nil
}

func (g *grpcClient) Health(ctx context.Context) (Health, error) {
	r, err := g.c.Health(ctx, &pb.Empty{})
	if err != nil {
		return Health{}, err
	}
	return Health{State: r.GetState(), Message: r.GetMessage()}, nil
}

func (g *grpcClient) Stats(ctx context.Context) (Stats, error) {
	r, err := g.c.Stats(ctx, &pb.Empty{})
	if err != nil {
		return Stats{}, err
	}
	return Stats{
		Connections: r.Connections, MessagesIn: r.MessagesIn, MessagesOut: r.MessagesOut,
		BytesIn: r.BytesIn, BytesOut: r.BytesOut, HeapBytes: r.HeapBytes, SysBytes: r.SysBytes,
		RSSBytes: r.RssBytes, Goroutines: int(r.Goroutines), Counters: r.Counters,
	}, nil
}

func (g *grpcClient) SetTopology(ctx context.Context, t Topology) error {
	_, err := g.c.SetTopology(ctx, topologyToPB(t))
	return err
}

func (g *grpcClient) Drain(ctx context.Context, timeout time.Duration) error {
	_, err := g.c.Drain(ctx, &pb.DrainRequest{TimeoutMs: timeout.Milliseconds()})
	return err
}

func (g *grpcClient) Stop(ctx context.Context) error {
	_, err := g.c.Stop(ctx, &pb.Empty{})
	return err
}

func (g *grpcClient) Reload(ctx context.Context, config []byte) error {
	_, err := g.c.Reload(ctx, &pb.ReloadRequest{ConfigJson: config})
	return err
}

func (g *grpcClient) Handover(ctx context.Context, code int, reason string, window, timeout time.Duration) error {
	_, err := g.c.Handover(ctx, &pb.HandoverRequest{
		TimeoutMs: timeout.Milliseconds(), CloseCode: int32(code), Reason: reason, WindowMs: window.Milliseconds(),
	})
	return err
}

type grpcServer struct {
	pb.UnimplementedChildServer
	impl Child
}

func (s *grpcServer) Start(ctx context.Context, r *pb.StartRequest) (*pb.StartReply, error) {
	res, err := s.impl.Start(ctx, StartParams{
		Role: Role(r.Role), Name: r.Name, Index: int(r.Index), Config: r.ConfigJson,
		RunDir: r.RunDir, Topology: topologyFromPB(r.Topology),
	})
	if err != nil {
		return nil, err
	}
	return &pb.StartReply{Addrs: res.Addrs}, nil
}

func (s *grpcServer) Health(ctx context.Context, _ *pb.Empty) (*pb.HealthReply, error) {
	h, err := s.impl.Health(ctx)
	if err != nil {
		return nil, err
	}
	return &pb.HealthReply{State: h.State, Message: h.Message}, nil
}

func (s *grpcServer) Stats(ctx context.Context, _ *pb.Empty) (*pb.StatsReply, error) {
	st, err := s.impl.Stats(ctx)
	if err != nil {
		return nil, err
	}
	return &pb.StatsReply{
		Connections: st.Connections, MessagesIn: st.MessagesIn, MessagesOut: st.MessagesOut,
		BytesIn: st.BytesIn, BytesOut: st.BytesOut, HeapBytes: st.HeapBytes, SysBytes: st.SysBytes,
		RssBytes: st.RSSBytes, Goroutines: int32(st.Goroutines), Counters: st.Counters,
	}, nil
}

func (s *grpcServer) SetTopology(ctx context.Context, t *pb.Topology) (*pb.Empty, error) {
	return &pb.Empty{}, s.impl.SetTopology(ctx, topologyFromPB(t))
}

func (s *grpcServer) Drain(ctx context.Context, r *pb.DrainRequest) (*pb.Empty, error) {
	return &pb.Empty{}, s.impl.Drain(ctx, time.Duration(r.TimeoutMs)*time.Millisecond)
}

func (s *grpcServer) Stop(ctx context.Context, _ *pb.Empty) (*pb.Empty, error) {
	return &pb.Empty{}, s.impl.Stop(ctx)
}

func (s *grpcServer) Reload(ctx context.Context, r *pb.ReloadRequest) (*pb.Empty, error) {
	rl, ok := s.impl.(Reloader)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this role cannot reload its config")
	}
	return &pb.Empty{}, rl.Reload(ctx, r.ConfigJson)
}

func (s *grpcServer) Handover(ctx context.Context, r *pb.HandoverRequest) (*pb.Empty, error) {
	h, ok := s.impl.(Handoverer)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this role cannot hand over its clients")
	}
	return &pb.Empty{}, h.Handover(ctx, int(r.CloseCode), r.Reason,
		time.Duration(r.WindowMs)*time.Millisecond, time.Duration(r.TimeoutMs)*time.Millisecond)
}

func topologyToPB(t Topology) *pb.Topology {
	out := &pb.Topology{Version: t.Version}
	for _, p := range t.Peers {
		out.Peers = append(out.Peers, &pb.Peer{
			Name: p.Name, Role: string(p.Role), State: p.State, Addrs: p.Addrs,
			Connections: p.Connections, Pid: int32(p.Pid),
		})
	}
	return out
}

func topologyFromPB(t *pb.Topology) Topology {
	if t == nil {
		return Topology{}
	}
	out := Topology{Version: t.Version}
	for _, p := range t.Peers {
		out.Peers = append(out.Peers, Peer{
			Name: p.Name, Role: Role(p.Role), State: p.State, Addrs: p.Addrs,
			Connections: p.Connections, Pid: int(p.Pid),
		})
	}
	return out
}
