// Quantiser, second stage: round the exact significand product to float32 (nearest even, as
// torch's float32 multiply does). The value is then m24 * 2^(e2 - 23).
`default_nettype none
module nc_quant_round (
    input  wire [9:0]  e,
    input  wire [31:0] prod,
    output reg  [23:0] m24,
    output reg  [10:0] e2        // two's complement
);
    reg  [23:0] m;
    reg         r, st, inc;
    reg  [24:0] m2;
    always @(*) begin
        if (prod[31]) begin m = prod[31:8]; r = prod[7]; st = |prod[6:0]; end
        else          begin m = prod[30:7]; r = prod[6]; st = |prod[5:0]; end
        inc = r & (st | m[0]);
        m2 = {1'b0, m} + {24'd0, inc};
        e2 = {e[9], e} + {10'd0, prod[31]} + {10'd0, m2[24]};
        m24 = m2[24] ? 24'h800000 : m2[23:0];
    end
endmodule
`default_nettype wire
