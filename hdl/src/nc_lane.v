// One lane: an upstream and a downstream converter side by side (the unit that the top level
// replicates LANES times; synthesised alone for the per-lane resource figures).
`default_nettype none
module nc_lane (
    input  wire        clk,
    input  wire        rst,
    input  wire        up_start,
    input  wire        dn_start,
    // job configuration, latched once by the top level and shared by all lanes
    input  wire [4:0]  up_n,
    input  wire [15:0] up_mask,
    input  wire [15:0] scale,
    input  wire [31:0] count_cfg,        // sampled at up_start
    input  wire [4:0]  dn_n,
    input  wire [15:0] dn_mask,
    input  wire [16:0] dn_hi,
    input  wire [16:0] dn_lomag,
    input  wire [31:0] inv,
    input  wire        up_s_valid,
    input  wire [15:0] up_s_data,
    input  wire        up_s_last,
    output wire        up_s_ready,
    output wire        up_m_valid,
    output wire [15:0] up_m_data,
    output wire        up_m_last,
    input  wire        up_m_ready,
    input  wire        dn_s_valid,
    input  wire [15:0] dn_s_data,
    input  wire        dn_s_last,
    output wire        dn_s_ready,
    output wire        dn_m_valid,
    output wire [15:0] dn_m_data,
    output wire        dn_m_last,
    input  wire        dn_m_ready,
    output wire        up_active,
    output wire        dn_active,
    output wire [4:0]  events      // {sat, inf, nan, long, short}
);
    nc_up_lane u_up (
        .clk(clk), .rst(rst), .start(up_start), .n(up_n), .mask(up_mask), .scale(scale),
        .count_cfg(count_cfg), .s_valid(up_s_valid), .s_data(up_s_data), .s_last(up_s_last),
        .s_ready(up_s_ready), .m_valid(up_m_valid), .m_data(up_m_data), .m_last(up_m_last),
        .m_ready(up_m_ready), .active(up_active), .ev_short(events[0]), .ev_long(events[1]));
    nc_dn_lane u_dn (
        .clk(clk), .rst(rst), .start(dn_start), .n(dn_n), .mask(dn_mask), .hi(dn_hi),
        .lomag(dn_lomag), .inv(inv), .s_valid(dn_s_valid), .s_data(dn_s_data), .s_last(dn_s_last),
        .s_ready(dn_s_ready), .m_valid(dn_m_valid), .m_data(dn_m_data), .m_last(dn_m_last),
        .m_ready(dn_m_ready), .active(dn_active), .ev_nan(events[2]), .ev_inf(events[3]),
        .ev_sat(events[4]));
endmodule
`default_nettype wire
