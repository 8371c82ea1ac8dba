// Timing harness for place and route: a lane whose inputs come from an on-chip LFSR and whose
// outputs are folded into one registered pin, so that it fits a small FPGA's I/O. The job
// configuration comes from the LFSR too (in the converter it is held stable by the top level).
`default_nettype none
module nc_lane_fmax (input wire clk, input wire rst, output reg out);
    reg [127:0] lfsr;
    wire fb = lfsr[127] ^ lfsr[125] ^ lfsr[100] ^ lfsr[98];
    always @(posedge clk) lfsr <= rst ? 128'h1 : {lfsr[126:0], fb};
    wire [44:0] o;
    nc_lane u (
        .clk(clk), .rst(rst), .up_start(lfsr[0]), .dn_start(lfsr[1]),
        .up_n(lfsr[6:2]), .up_mask(lfsr[22:7]), .scale(lfsr[38:23]),
        .count_cfg({24'd0, lfsr[63:56]}), .dn_n(lfsr[106:102]), .dn_mask(lfsr[122:107]),
        .dn_hi({lfsr[123], lfsr[15:0]}), .dn_lomag({lfsr[124], lfsr[31:16]}),
        .inv({lfsr[127:125], lfsr[55:27]}),
        .up_s_valid(lfsr[64]), .up_s_data(lfsr[80:65]), .up_s_last(lfsr[81]), .up_s_ready(o[0]),
        .up_m_valid(o[1]), .up_m_data(o[17:2]), .up_m_last(o[18]), .up_m_ready(lfsr[82]),
        .dn_s_valid(lfsr[83]), .dn_s_data(lfsr[99:84]), .dn_s_last(lfsr[100]), .dn_s_ready(o[19]),
        .dn_m_valid(o[20]), .dn_m_data(o[36:21]), .dn_m_last(o[37]), .dn_m_ready(lfsr[101]),
        .up_active(o[38]), .dn_active(o[39]), .events(o[44:40]));
    always @(posedge clk) out <= ^o;
endmodule
`default_nettype wire
